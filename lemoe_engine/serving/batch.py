"""Per-request LEMoE routing over a serving engine's flattened token batches (no vLLM import).

A serving engine such as vLLM runs many requests in one forward call: their tokens are
concatenated into one ``[num_tokens, d]`` matrix, a request's prompt may sit next to other
requests' decode tokens, requests join and leave between steps. The Hugging Face path routes a
sequence once, on its whole prompt, and keeps that route for every token it generates.
``RequestRouter`` does the same on flattened batches:

- the engine tells it, before each forward, which rows belong to which request and how far
  each request is (``RequestSlice``: start row, row count, tokens already in the KV cache,
  prompt length);
- a request whose rows start at position 0 (a new request, or one re-prefilled after
  preemption) is routed on its prompt positions only, with the package's own routing code
  (``LEMoELayer.route`` on a padded batch, as the HF path calls it); the route is kept by
  request id;
- the prompt's own rows get the route as the HF prefill gives it per position (with
  ``expert_span='key'``: no expert before the token that matched its key);
- every later step of that request reuses the kept route; requests that finish are forgotten;
- with the adaptor's question gate on, a new request's route is kept only when its prompt
  (``RequestSlice.prompt_ids``) asks one of the expert's edited questions, as on the HF path;
- the expert FFNs are then applied to all rows at once (the fused kernel on CUDA, the eager
  reference elsewhere), added to the base MLP output.

A prompt split over several forward calls (chunked prefill) or partly served from a prefix
cache cannot be routed as the HF path routes it: the route of the prompt's first tokens
depends on its last ones. Such a request raises ``RoutingStateError``; the vLLM integration
turns both features off.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from ..layer import LEMoELayer, RouteContext


class RoutingStateError(RuntimeError):
    """The engine scheduled tokens whose route cannot be decided as the HF path decides it."""


@dataclass(frozen=True)
class RequestSlice:
    """The rows of one request in one forward call's flattened tokens."""

    req_id: str
    start: int
    """First row of the request's tokens in this call."""
    count: int
    """Number of its tokens in this call (the whole prompt for a prefill, 1 for a decode step)."""
    computed: int
    """Tokens of the request already in the KV cache before this call (0: prefill from scratch)."""
    prompt_len: int
    """Length of the request's prompt (the tokens its route is decided on)."""
    prompt_ids: Optional[Sequence[int]] = None
    """The prompt's token ids, for a request routed in this call (``computed == 0``) when the
    layer has a route filter that reads them (the question gate); else None."""


class RequestRouter:
    """Routes the rows of flattened batches per request, with the routes of ``layer``.

    ``layer`` is a LEMoELayer holding the adaptor (see ``load_adaptor_layer``); its
    ``base_layer`` is not used: the engine computes the base MLP and passes its output.
    """

    def __init__(self, layer: LEMoELayer) -> None:
        self.layer = layer
        self.routes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.plan: Optional[list[RequestSlice]] = None
        self.stats: Counter = Counter()

    # ------------------------------------------------------------------ engine side
    def set_plan(self, slices: Sequence[RequestSlice], live: Optional[Iterable[str]] = None) -> None:
        """Describe the next forward call. ``live``: ids of all requests the engine still holds
        (running or preempted); the routes of other requests are dropped."""
        self.plan = list(slices)
        start = 0
        for s in self.plan:
            if s.start != start:
                raise RoutingStateError(f"batch plan rows are not consecutive at request {s.req_id}")
            start += s.count
        if live is not None:
            keep = set(live)
            for req_id in [r for r in self.routes if r not in keep]:
                del self.routes[req_id]

    # ------------------------------------------------------------------ model side
    def apply(self, x: torch.Tensor, out: torch.Tensor, vectors: Optional[torch.Tensor]) -> torch.Tensor:
        """``out`` (the base MLP output of rows ``x``, [N, d]) plus the routed experts.

        ``vectors``: the rows' query source vectors [N, d'] (None for query_source='hidden').
        Consumes the plan set by ``set_plan``; without one (the engine's warm-up and profiling
        runs) the experts are skipped.
        """
        plan, self.plan = self.plan, None
        layer = self.layer
        if layer.num_experts == 0 or layer.disabled:
            return out
        if plan is None:
            self.stats["unplanned_calls"] += 1
            return out
        planned = sum(s.count for s in plan)
        if planned > x.shape[0]:
            raise RoutingStateError(f"the batch plan covers {planned} tokens but the forward call has "
                                    f"{x.shape[0]}: the engine's batch bookkeeping is out of step")
        self.stats["steps"] += 1
        fresh = sum(1 for s in plan if s.computed == 0)
        if fresh and fresh < len(plan):
            self.stats["mixed_steps"] += 1  # prefill and decode of different requests together
        ids, weights = self.token_routes(plan, x, vectors)
        return self.add_experts(x, out, ids, weights)

    def token_routes(self, plan: Sequence[RequestSlice], x: torch.Tensor,
                     vectors: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and weights of every row, [N, top_k] each (rows outside the plan: none)."""
        layer = self.layer
        n, k = x.shape[0], layer.config.top_k
        ids = torch.full((n, k), -1, dtype=torch.int32, device=x.device)
        weights = torch.zeros((n, k), dtype=torch.float32, device=x.device)
        if layer.config.routing == "token":
            # every token routes on its own vector, prompt and generated tokens alike
            token_ids, token_weights = self._route_padded(x[None], None if vectors is None else vectors[None],
                                                          mask=None, per_token=True)
            for s in plan:
                rows = slice(s.start, s.start + s.count)
                ids[rows], weights[rows] = token_ids[rows], token_weights[rows]
            return ids, weights
        fresh = []
        for s in plan:
            if s.computed == 0:
                if s.count < s.prompt_len:
                    raise RoutingStateError(
                        f"request {s.req_id}: only {s.count} of its {s.prompt_len} prompt tokens are in "
                        "this forward call (chunked prefill); LEMoE routes a request on its whole prompt, "
                        "so chunked prefill must be off (enable_chunked_prefill=False)")
                fresh.append(s)
                if s.req_id in self.routes:
                    self.stats["reprefills"] += 1  # resumed after preemption: routed again, same prompt
            elif s.req_id not in self.routes:
                raise RoutingStateError(
                    f"request {s.req_id} continues at token {s.computed} but was never routed on its "
                    "prompt (prefix caching or chunked prefill is on?); LEMoE serving needs "
                    "enable_prefix_caching=False and enable_chunked_prefill=False")
        prompt_routes = {}
        if fresh:
            self.stats["prefills"] += len(fresh)
            prompt_routes = self._route_prompts(fresh, x, vectors)
            self.routes.update({req: (ids_p[-1], weights_p[-1]) for req, (ids_p, weights_p) in prompt_routes.items()})
        if not plan:
            return ids, weights
        # one row per request, repeated over its tokens (plan rows are consecutive from row 0)
        planned = sum(s.count for s in plan)
        counts = torch.tensor([s.count for s in plan], device=x.device)
        ids[:planned] = torch.stack([self.routes[s.req_id][0] for s in plan]).repeat_interleave(
            counts, dim=0, output_size=planned)
        weights[:planned] = torch.stack([self.routes[s.req_id][1] for s in plan]).repeat_interleave(
            counts, dim=0, output_size=planned)
        for s in fresh:  # a prompt's own rows as the HF path routes them (expert_span='key': none before the key)
            ids_p, weights_p = prompt_routes[s.req_id]
            ids[s.start:s.start + s.prompt_len], weights[s.start:s.start + s.prompt_len] = ids_p, weights_p
        return ids, weights

    def _route_prompts(self, fresh: Sequence[RequestSlice], x: torch.Tensor,
                       vectors: Optional[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Route new requests on their prompt positions, as one right-padded batch: per request,
        the ids and weights of each prompt position, [prompt_len, top_k] (its last position's
        are the route its generated tokens keep)."""
        length = max(s.prompt_len for s in fresh)
        batch = len(fresh)
        xs = x.new_zeros(batch, length, x.shape[1])
        vs = None if vectors is None else vectors.new_zeros(batch, length, vectors.shape[1])
        mask = torch.zeros(batch, length, dtype=torch.long, device=x.device)
        token_ids = None
        if self.layer.route_filter is not None:  # the question gate reads the prompts' tokens
            missing = [s.req_id for s in fresh if s.prompt_ids is None or len(s.prompt_ids) != s.prompt_len]
            if missing:
                raise RoutingStateError(f"requests {missing[:3]} come without their prompt's token ids, which "
                                        "the adaptor's question gate reads (RequestSlice.prompt_ids)")
            token_ids = torch.zeros(batch, length, dtype=torch.long)
        for b, s in enumerate(fresh):
            rows = slice(s.start, s.start + s.prompt_len)  # positions 0..prompt_len-1
            xs[b, :s.prompt_len] = x[rows]
            if vs is not None:
                vs[b, :s.prompt_len] = vectors[rows]
            mask[b, :s.prompt_len] = 1
            if token_ids is not None:
                token_ids[b, :s.prompt_len] = torch.as_tensor(list(s.prompt_ids), dtype=torch.long)
        ids, weights = self._route_padded(xs, vs, mask, per_token=False, input_ids=token_ids)
        k = ids.shape[1]
        ids, weights = ids.view(batch, length, k), weights.view(batch, length, k)
        return {s.req_id: (ids[b, :s.prompt_len].clone(), weights[b, :s.prompt_len].clone())
                for b, s in enumerate(fresh)}

    def _route_padded(self, xs: torch.Tensor, vs: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                      per_token: bool, input_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``LEMoELayer.route`` on a [B, T, d] batch, exactly as the HF path calls it."""
        layer = self.layer
        layer.set_route_context(RouteContext(attention_mask=mask, embeddings=vs, continuing=False,
                                             input_ids=input_ids))
        try:
            return layer.route(xs, store=False)
        finally:
            layer.set_route_context(RouteContext())

    def add_experts(self, x: torch.Tensor, out: torch.Tensor, ids: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
        """``out[n] += scale * sum_j weights[n, j] * f_{ids[n, j]}(x[n])`` (``LEMoELayer.apply_experts``:
        the kernel on CUDA, the eager reference elsewhere)."""
        return self.layer.apply_experts(x, out, ids, weights)
