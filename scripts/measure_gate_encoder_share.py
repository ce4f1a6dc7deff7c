"""How often the question gate runs its sentence encoder on prompts about other things.

Loads an edited adaptor onto the bundled model, turns the gate on with today's defaults (serving
by name, the name floor 0.55; older adaptors load with their own settings otherwise), and
prefills each distinct locality prompt of the first N records of an edit file, one at a time,
counting those for which the gate made an encoder call (it does only for a prompt with an
anchored route or one naming an edited subject) and those it served (an expert's output).

    python scripts/measure_gate_encoder_share.py --adaptor DIR [--edits FILE] [--limit 1000] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

from lemoe_engine import load, question_gate
from lemoe_engine.config import DEFAULT_QUESTION_GATE_NAME_FLOOR
from lemoe_engine.data import BUNDLED_EDITS, load_edits
from lemoe_engine.models import load_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adaptor", required=True)
    parser.add_argument("--edits", default=str(BUNDLED_EDITS))
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    layer = load(model, args.adaptor, tokenizer=tokenizer)
    layer.config = layer.config.replace(question_gate_by_name=True,
                                        question_gate_name_floor=DEFAULT_QUESTION_GATE_NAME_FLOOR)
    question_gate.enable(model, tokenizer)
    prompts = list(dict.fromkeys(e.loc_prompt for e in load_edits(args.edits, skip_invalid=True)[:args.limit]))
    calls, real = [], question_gate._embed
    question_gate._embed = lambda texts: calls.append(len(texts)) or real(texts)
    paid = served = 0
    try:
        with torch.no_grad():
            model(input_ids=tokenizer(["warm up"], return_tensors="pt").input_ids)  # the gate's own embeddings
            for prompt in prompts:
                calls.clear()
                model(input_ids=tokenizer([prompt], return_tensors="pt").input_ids)
                paid += bool(calls)
                served += int(layer._sequence_route[0][0, 0]) >= 0
    finally:
        question_gate._embed = real
    print(f"{len(prompts)} locality prompts: the encoder ran for {paid} ({paid / len(prompts):.3f}), "
          f"{served} served by an expert")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
