"""Everything an edit run decides before training, from the prompts alone: the query centre,
each edit's key token and anchor, each anchor's gate threshold, and the route each edit's prompt
gets when served (``Calibration``, used by ``editor.LifelongEditor``).

* Query vectors: the forward pass stops where the query source is made (decoder layer N, or the
  embeddings), and a run computes each prompt once (``vector_cache``).
* Keys: an edit's subject's last token (the record's subject, else ``keys.guess_subject``),
  pooled with the subject's tokens before it, up to ``query_window`` tokens (``key_spans``,
  ``key_windows``).
* Gate: a threshold sits ``gate_margin`` above the best score an unrelated prompt reaches on the
  anchor (prompts naming the edit's subject left out), never above its own edit's score.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import vector_cache
from .data import EditRecord
from .keys import guess_subject, names_subject
from .layer import LEMoELayer
from .patching import adaptors_disabled, decoder_layers, query_mask
from .planner import KEY_GROUP_SIMILARITY
from .routing import route_scores, window_mean
from .tokens import collate, encode_pairs, pad_id

ANCHOR_CHUNK = 256
"""Edits whose anchors ``Calibration._run_anchors`` computes together (bounds the [tokens, anchors]
score matrices against the unrelated pool)."""


class Calibration:
    """Queries, anchors and gate thresholds for the edits of ``layer``'s model.

    ``unrelated_prompts`` are prompts the edits must leave alone; they fit the query centre and
    calibrate each anchor's gate. Never pass the locality prompts you score."""

    def __init__(self, model: nn.Module, tokenizer, layer: LEMoELayer, unrelated_prompts: Sequence[str]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.unrelated_prompts = list(unrelated_prompts)
        self._unrelated_raw: Optional[list[torch.Tensor]] = None
        self._unrelated_queries: dict[int, object] = {}  # key window -> the pool's queries
        self.vector_cache: Optional[dict[str, torch.Tensor]] = None  # prompt -> raw token vectors, during a run
        self.progress = False  # show a bar while embedding the gate pool (set by the editor's run)
        self.device = next(model.parameters()).device
        self.pad_id = pad_id(tokenizer)

    def run_prompts(self, prompts: Sequence[str], capture: Callable, batch_size: int = 64,
                     query_only: bool = False, progress: Optional[str] = None) -> list:
        """Forward ``prompts`` (adaptor off) up to the target layer and collect
        ``capture(layer, layer_input)`` per batch (the layers above are not run). ``query_only``:
        ``capture`` reads only the query source vectors, so the forward stops where they are made
        (decoder layer N for ``query_source="layerN"``, the embeddings for ``"embedding"``):
        embedding thousands of gate-calibration prompts costs a few layers, not the target's.
        ``progress``: the description of a progress bar over the prompts (None: no bar)."""
        captured: list = []
        layer = self.layer

        def hook(module, args, output):
            captured.append(capture(layer, args[0]))
            raise _StopForward

        def at_query_layer(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured.append(capture(layer, hidden))
            raise _StopForward

        def after_embedding(module, args, output):
            captured.append(capture(layer, output))
            raise _StopForward

        # registered after attach's hooks, so these run after the query vectors are handed over
        if query_only and layer.config.query_source == "embedding":
            handle = self.model.get_input_embeddings().register_forward_hook(after_embedding)
        elif query_only and layer.config.query_layer is not None:
            handle = decoder_layers(self.model)[layer.config.query_layer].register_forward_pre_hook(
                at_query_layer, with_kwargs=True)
        else:
            handle = layer.register_forward_hook(hook)
        try:
            bar = tqdm(total=len(prompts), desc=progress, unit="prompt", disable=progress is None, leave=False)
            with torch.no_grad(), adaptors_disabled(self.model), bar:
                for start in range(0, len(prompts), batch_size):
                    chunk = list(prompts[start:start + batch_size])
                    rows = encode_pairs(self.tokenizer, chunk, ["x"] * len(chunk))
                    ids, attention, prompt_mask = collate(rows, self.pad_id, self.device)
                    try:
                        with query_mask(self.model, prompt_mask):
                            self.model(input_ids=ids, attention_mask=attention, use_cache=False)
                    except _StopForward:
                        pass
                    bar.update(len(chunk))
        finally:
            handle.remove()
        return captured

    def token_vectors(self, prompts: Sequence[str], progress: Optional[str] = None) -> list[torch.Tensor]:
        """Per prompt, the raw source vector of each of its tokens, [n_i, d] (before centring).
        During a run (``edit``) each prompt is computed once and kept until the run ends."""
        cache = self.vector_cache
        missing = list(dict.fromkeys(p for p in prompts if cache is None or p not in cache))
        # batches of similar length pad little (thousands of gate prompts: 2x less work)
        missing.sort(key=len)

        def capture(layer: LEMoELayer, x: torch.Tensor):
            mask = layer.prompt_mask(x).bool()
            return [v[m].float().cpu() for v, m in zip(layer.token_vectors(x), mask)]
        batches = self.run_prompts(missing, capture, query_only=True, progress=progress)
        computed = dict(zip(missing, (v for batch in batches for v in batch)))
        if cache is not None:
            cache.update(computed)
            computed = cache
        return [computed[p] for p in prompts]

    def encode(self, vectors: Sequence[torch.Tensor], window: int = 1) -> list[torch.Tensor]:
        """Unit queries of per-prompt token vectors [n_i, d], each token pooled with the
        ``window - 1`` before it (``routing.token_queries``, as the layer routes)."""
        encoder = self.layer.query_encoder
        with torch.no_grad():
            return [encoder(window_mean(v.to(self.device)[None], None, window)[0]).cpu() for v in vectors]

    def token_queries(self, prompts: Sequence[str], window: int = 1) -> list[torch.Tensor]:
        """Per prompt, the unit-norm routing query of each of its tokens, [n_i, key]."""
        return self.encode(self.token_vectors(prompts), window)

    def scores(self, prompts: Sequence[str], anchors: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Max-pooled scores [P, M] of ``prompts`` on ``anchors``, each anchor against queries of
        its own key window (``windows`` [M]), exactly as the layer routes."""
        vectors = self.token_vectors(prompts)
        return _per_window(windows, lambda window: _max_sim(*_pad(self.encode(vectors, window)), anchors))

    def own_scores(self, prompts: Sequence[str], anchors: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """``scores(prompts, anchors, windows).diagonal()`` without the other pairs: each prompt's
        max-pooled score on its own anchor [P]."""
        vectors = self.token_vectors(prompts)
        out = torch.empty(len(prompts))
        for window in sorted(set(windows.tolist())):
            chosen = [i for i, w in enumerate(windows.tolist()) if w == window]
            for i, queries in zip(chosen, self.encode([vectors[i] for i in chosen], window)):
                out[i] = (queries @ anchors[i].cpu().float()).max()
        return out

    def sequence_queries(self, prompts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled unit queries of ``prompts`` [n, key] (the paper's instance query)."""
        return self.pooled_queries(self.token_vectors(prompts))

    def pooled_queries(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(self.encode([v.mean(dim=0, keepdim=True) for v in vectors]))

    def routes(self, prompts: Sequence[str]) -> torch.Tensor:
        """The expert each prompt routes to now as the anchors decide (top-1, -1 = none): the question
        gate, when on, then drops the route, picks another expert of the same subject, or serves a
        prompt left without one by the edited subject it names."""
        def capture(layer: LEMoELayer, x: torch.Tensor):
            return layer._route(x)[0][:, 0].cpu()
        return torch.cat(self.run_prompts(prompts, capture))

    def key_windows(self, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Per edit, how many prompt tokens its key pools: the tokens of the subject it is keyed
        on (``key_spans``), at most ``query_window``."""
        most = self.layer.config.query_window if self.max_pooling else 1
        return torch.tensor([max(1, min(most, last - first + 1)) for first, last in spans], dtype=torch.int32)

    def keys(self, edits: Sequence[EditRecord]) -> tuple[torch.Tensor, torch.Tensor]:
        """Max pooling: each edit's anchor (its key's query, pooled over its key window) [n, key]
        and key window [n]."""
        vectors = self.token_vectors([e.prompt for e in edits])
        spans = self.key_spans(edits, self.encode(vectors))
        positions = [last for _, last in spans]
        windows = self.key_windows(spans)
        anchors = [None] * len(edits)
        for window in sorted(set(windows.tolist())):
            chosen = [i for i, w in enumerate(windows.tolist()) if w == window]
            for i, queries in zip(chosen, self.encode([vectors[i] for i in chosen], window)):
                anchors[i] = queries[positions[i]]
        return torch.stack(anchors), windows

    def unrelated_vectors(self) -> list[torch.Tensor]:
        """Raw token vectors of the unrelated prompts: computed once (the layers below the query
        source are frozen), then centred/encoded as needed. Kept on disk between runs
        (``vector_cache``: the same values, read back instead of recomputed)."""
        if self._unrelated_raw is None:
            key = self._pool_key()
            cached = vector_cache.load_pool(key, len(self.unrelated_prompts)) if key else None
            if cached is None:
                cached = self.token_vectors(self.unrelated_prompts, progress=(
                    "gate pool (kept on disk for later runs)" if key else "gate pool") if self.progress else None)
                if key:
                    vector_cache.store_pool(key, cached, next(self.model.parameters()).dtype)
            self._unrelated_raw = cached
        return self._unrelated_raw

    def _pool_key(self) -> Optional[str]:
        """The disk-cache key of the unrelated pool's vectors (None: the disk cache is off, or
        the key cannot be made here, e.g. weights offloaded to the meta device: then no cache)."""
        if vector_cache.cache_dir() is None:
            return None
        config = self.layer.config
        layers = decoder_layers(self.model)
        try:
            if config.query_source == "embedding":
                lower = [self.model.get_input_embeddings()]
            elif config.query_layer is not None:
                lower = [self.model.get_input_embeddings(), *layers[:config.query_layer]]
            else:  # the target MLP's input: its own decoder layer's attention and norms too
                lower = [self.model.get_input_embeddings(), *layers[:config.resolved_layer(len(layers)) + 1]]
            rows = encode_pairs(self.tokenizer, self.unrelated_prompts, ["x"] * len(self.unrelated_prompts))
            encoded = [[list(map(int, row.ids)), int(row.prompt_len)] for row in rows]
            return vector_cache.pool_key(self.model, lower, [self.layer], config.query_source,
                                         self.unrelated_prompts, encoded)
        except Exception as exc:  # no key, no cache: the run itself goes on
            warnings.warn(f"lemoe_engine: the gate pool's vectors are not cached this run ({exc})", stacklevel=2)
            return None

    def fit_center(self, prompts: Sequence[str]) -> None:
        """Before the first expert: remove the mean direction all token vectors share. Fixed after."""
        vectors = torch.cat(self.token_vectors(prompts) + self.unrelated_vectors())
        with torch.no_grad():
            self.layer.query_encoder.center.copy_(vectors.mean(dim=0).to(self.device))
        self._unrelated_queries = {}

    def unrelated(self, window: int = 1):
        """The unrelated prompts' queries: ``_FlatQueries`` (max pooling: every token, pooled
        over ``window`` tokens, flat, no padding to the longest prompt) or [P, key] pooled
        queries (mean pooling)."""
        if window not in self._unrelated_queries:
            raw = self.unrelated_vectors()
            if self.max_pooling:
                self._unrelated_queries[window] = _FlatQueries.of(self.encode(raw, window))
            else:
                self._unrelated_queries[window] = self.pooled_queries(raw)
        return self._unrelated_queries[window]

    def unrelated_best(self, edits: Sequence[EditRecord], anchors: torch.Tensor,
                       windows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per anchor (one per edit, max pooling), the best score an unrelated prompt reaches on
        it, leaving out the unrelated prompts that name that edit's subject: a question about the
        subject is not unrelated to it, and counting it would shut the gate on its paraphrases.

        Only a record's own ``subject`` counts (a guessed one can be a common word), matched
        case-sensitively as a whole name (not inside a longer capitalised or hyphenated name:
        "Guinea" does not name "Papua New Guinea"); when every unrelated prompt names it, none is
        left out (an empty pool would leave the gate open)."""
        windows = torch.ones(anchors.shape[0], dtype=torch.int32) if windows is None else windows
        scores = _per_window(windows, lambda window: self.unrelated(window).best(anchors))  # [P, M]
        for column, edit in enumerate(edits):
            if not edit.subject:
                continue
            rows = [i for i, text in enumerate(self.unrelated_prompts) if names_subject(text, edit.subject)]
            if rows and len(rows) < scores.shape[0]:
                scores[rows, column] = float("-inf")
        return scores.max(dim=0).values

    @property
    def max_pooling(self) -> bool:
        return self.layer.config.query_pooling == "max"

    def key_spans(self, edits: Sequence[EditRecord], queries: list[torch.Tensor]) -> list[tuple[int, int]]:
        """Per edit, the (first, last) prompt tokens of the subject it is keyed on; its key is the
        last (where the model recalls facts about the subject). The subject is the record's or,
        without one, guessed from the prompt (``keys.guess_subject``); failing both, the key is
        the prompt token least like any token of the unrelated prompts, alone."""
        spans = []
        pool = None
        for edit, query in zip(edits, queries):
            span = _subject_span(self.tokenizer, edit.prompt, edit.subject, len(query))
            if span is None:
                span = _subject_span(self.tokenizer, edit.prompt, guess_subject(edit.prompt), len(query))
            if span is None:
                if pool is None:
                    pool = self.unrelated().tokens
                position = int((query @ pool.T).max(dim=1).values.argmin())
                span = (position, position)
            spans.append(span)
        return spans

    def new_anchors(self, edits: Sequence[EditRecord]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Anchors of the batch's new expert, their gate thresholds (cosine) and key windows.

        A threshold sits ``gate_margin`` above the best score an unrelated prompt reaches on that
        anchor (``_unrelated_best``: prompts naming the edit's subject left out), but never above
        the score of the edit the anchor was made from."""
        margin = self.layer.config.gate_margin
        prompts = [e.prompt for e in edits]
        if self.max_pooling:
            anchors, windows = self.keys(edits)
            unrelated_best = self.unrelated_best(edits, anchors, windows)
            own = self.own_scores(prompts, anchors, windows)
        else:
            queries = self.sequence_queries(prompts)
            anchors = F.normalize(queries.mean(dim=0, keepdim=True), dim=-1)
            windows = torch.ones(1, dtype=torch.int32)
            unrelated_best = (self.unrelated() @ anchors.T).max(dim=0).values
            own = (queries @ anchors.T).min(dim=0).values
        thresholds = torch.minimum(unrelated_best + margin, own - 1e-6)
        return anchors, thresholds, windows

    def _run_anchors(self, batches: Sequence[Sequence[EditRecord]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``new_anchors`` of every batch. With max pooling an anchor, its window and its
        threshold depend on its own edit alone, so the run's edits are computed together, in
        chunks of ``ANCHOR_CHUNK`` (one pass for their vectors, one matmul against the unrelated
        pool), and split per batch; mean pooling makes one anchor per batch, batch by batch."""
        if not self.max_pooling:
            return [self.new_anchors(edits) for edits in batches]
        flat = [edit for edits in batches for edit in edits]
        if self.vector_cache is not None:  # one batched pass, kept for the run
            self.token_vectors([edit.prompt for edit in flat])
        parts = [self.new_anchors(flat[i:i + ANCHOR_CHUNK]) for i in range(0, len(flat), ANCHOR_CHUNK)]
        anchors, gates, windows = (torch.cat([part[k] for part in parts]) for k in range(3))
        out, start = [], 0
        for edits in batches:
            end = start + len(edits)
            out.append((anchors[start:end], gates[start:end], windows[start:end]))
            start = end
        return out

    def calibrate(self, batches: Sequence[Sequence[EditRecord]], by_question: bool = False) -> list["Calibrated"]:
        """Everything decided before training, for every batch of a run: anchors, gate
        thresholds, shared keys, and the route each edit's prompt gets when served among the
        experts up to its own (the later ones do not exist yet when it would train alone).
        ``by_question`` (top-1): the question gate serves, among the experts keyed on one subject,
        the one holding the question asked, so a prompt the anchors send to a same-key expert
        is served by its own, which holds it word for word."""
        layer = self.layer
        first = layer.num_experts
        out: list[Calibrated] = []
        known = layer.anchors.float().cpu()
        owners = [layer.anchor_expert.long().cpu()]
        thresholds = [layer.gate_thresholds().float().cpu()]
        windows_all = [layer.anchor_window.cpu()]
        anchors_all = [known]
        for number, (edits, (anchors, gates, windows)) in enumerate(zip(batches, self._run_anchors(batches))):
            shared = 0
            seen = torch.cat(anchors_all)
            if seen.shape[0]:
                similarity = F.normalize(anchors.float(), dim=-1) @ seen.T
                shared = int((similarity.max(dim=1).values >= KEY_GROUP_SIMILARITY).sum())
            out.append(Calibrated(edits=list(edits), expert=first + number, anchors=anchors, thresholds=gates,
                                   shared_keys=shared, windows=windows))
            anchors_all.append(F.normalize(anchors.float(), dim=-1))
            windows_all.append(windows)
            owners.append(torch.full((anchors.shape[0],), first + number, dtype=torch.long))
            thresholds.append(gates.float() if layer.config.gate else torch.full_like(gates.float(), float("-inf")))
        anchors_all, owners, thresholds = torch.cat(anchors_all), torch.cat(owners), torch.cat(thresholds)
        windows_all = torch.cat(windows_all)
        prompts = [e.prompt for c in out for e in c.edits]
        own = torch.tensor([c.expert for c in out for _ in c.edits])
        routes = []
        for start in range(0, len(prompts), 256):
            chunk = prompts[start:start + 256]
            if self.max_pooling:
                scores = self.scores(chunk, anchors_all, windows_all)
            else:
                scores = self.sequence_queries(chunk) @ anchors_all.T
            later = owners.unsqueeze(0) > own[start:start + len(chunk)].unsqueeze(1)
            scores = scores.masked_fill(later, float("-inf"))
            routes.append(route_scores(scores, thresholds, owners, first + len(out), layer.config.top_k,
                                       layer.config.temperature))
        ids = torch.cat([r[0] for r in routes])
        weights = torch.cat([r[1] for r in routes])
        if by_question and layer.config.top_k == 1:
            for i in ((ids[:, 0] >= 0) & (ids[:, 0] != own)).nonzero().flatten().tolist():
                routed, mine = anchors_all[owners == ids[i, 0]], anchors_all[owners == own[i]]
                if float((mine @ routed.T).max()) >= KEY_GROUP_SIMILARITY:
                    ids[i, 0] = own[i]
        n = 0
        for c in out:
            c.routes = [(ids[n + i].tolist(), weights[n + i].tolist()) for i in range(len(c.edits))]
            n += len(c.edits)
        return out


class _StopForward(Exception):
    """Ends a forward pass once the layer's input has been captured."""


@dataclass
class Calibrated:
    edits: list
    expert: int
    anchors: torch.Tensor
    thresholds: torch.Tensor
    shared_keys: int
    windows: torch.Tensor = None  # per anchor: how many prompt tokens its key pools
    routes: list = field(default_factory=list)  # per edit: (expert ids, weights) when served


@dataclass
class _FlatQueries:
    """Token queries of many prompts, flat: ``tokens`` [N, k], ``owner`` [N] (prompt index)."""

    tokens: torch.Tensor
    owner: torch.Tensor
    count: int

    @classmethod
    def of(cls, queries: Sequence[torch.Tensor]) -> "_FlatQueries":
        owner = torch.cat([torch.full((q.shape[0],), i, dtype=torch.long) for i, q in enumerate(queries)])
        return cls(tokens=torch.cat(list(queries)), owner=owner, count=len(queries))

    def best(self, anchors: torch.Tensor) -> torch.Tensor:
        """Max-pooled scores [P, M]: each prompt's best token against each anchor."""
        scores = self.tokens @ anchors.T.cpu()                                  # [N, M]
        out = torch.full((self.count, scores.shape[1]), float("-inf"))
        return out.scatter_reduce(0, self.owner[:, None].expand_as(scores), scores, reduce="amax")


def _per_window(windows: torch.Tensor, score: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Scores [P, M] where column m is ``score(windows[m])[:, m]``: each anchor scored against
    queries of its own key window (``score(w)`` gives every anchor's scores for window w)."""
    out = None
    for window in sorted(set(windows.tolist())) or [1]:
        part = score(window)
        out = part if out is None else torch.where(windows == window, part, out)
    return out


def _pad(queries: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-prompt token queries [n_i, k] into [P, T, k] plus a [P, T] validity mask."""
    length = max(q.shape[0] for q in queries)
    padded = torch.zeros(len(queries), length, queries[0].shape[1])
    mask = torch.zeros(len(queries), length, dtype=torch.bool)
    for i, q in enumerate(queries):
        padded[i, :q.shape[0]] = q
        mask[i, :q.shape[0]] = True
    return padded, mask


def _max_sim(padded: torch.Tensor, mask: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Max-pooled scores [P, M]: each prompt's best token against each anchor."""
    scores = padded @ anchors.T.cpu()
    return scores.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1).values


def _subject_span(tokenizer, prompt: str, subject: Optional[str], n_tokens: int) -> Optional[tuple[int, int]]:
    """(first, last) index among the ``n_tokens`` model-input tokens of ``prompt`` of the tokens
    of ``subject``'s last mention (the last holds its last character), or None. A slow
    tokenizer has no offsets: the last token alone, (last, last)."""
    if not subject:
        return None
    start = prompt.rfind(subject)
    if start < 0:
        return None
    end = start + len(subject)
    try:
        offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        last = len(tokenizer(prompt[:end], add_special_tokens=False)["input_ids"]) - 1
        return last, last
    shift = n_tokens - len(offsets)  # special tokens the model input has in front
    hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > a]
    if not hits:
        return None
    first = next((i for i in hits if offsets[i][1] > start), hits[-1])
    return first + shift, hits[-1] + shift
