"""Edit the first T records of an edit file with the default editor (or ``--negatives N``, ``--augment N``,
``--no-chat``, ``--strip-subject``: edited without their ``subject`` field, scored on the same
specificity prompts as with it) and print one JSON line with every metric style
(teacher-forced, greedy, chat), the edit wall time and the steps each expert took.

    python scripts/measure_edit_styles.py --limit 20 --tag default
    python scripts/measure_edit_styles.py --limit 20 --negatives 4 --tag negatives4
"""
import json, sys, time, argparse, torch
torch.set_num_threads(1)
from lemoe_engine.cli import train_dtype_option
from lemoe_engine.models import load_model
from lemoe_engine.data import load_edits, BUNDLED_EDITS
from lemoe_engine.editor import LifelongEditor, EditorConfig
from lemoe_engine.evaluation import evaluate, unedited_reference
p = argparse.ArgumentParser()
p.add_argument("--edits", default=str(BUNDLED_EDITS)); p.add_argument("--limit", type=int, default=100)
p.add_argument("--negatives", type=int, default=None,
               help="EditorConfig.negatives (default: the config's, 0)"); p.add_argument("--no-chat", action="store_true")
p.add_argument("--strip-subject", action="store_true"); p.add_argument("--styles", default="tf,gen,chat")
p.add_argument("--tag", default=""); p.add_argument("--augment", type=int, default=0)
p.add_argument("--lr", type=float, default=None, help="EditorConfig.learning_rate (default: the config's)")
p.add_argument("--stop-loss", type=float, default=None, help="EditorConfig.stop_loss (default: the config's)")
p.add_argument("--question-gate", type=float, default=None, help="serve with the question gate at this cosine "
               "(default: the config's, on)")
p.add_argument("--no-question-gate", action="store_true", help="serve without the question gate")
p.add_argument("--layer", type=int, default=None, help="LEMoEConfig.layer (default: the config's)")
p.add_argument("--train-dtype", default=None, help="EditorConfig.train_dtype, or 'model' for None (default: the config's)")
p.add_argument("--no-select", action="store_true", help="LEMoEConfig.question_gate_selects=False: one expert "
               "per subject, the gate checks the anchors' choice")
a = p.parse_args()
edits = load_edits(a.edits, limit=a.limit, skip_invalid=True)
scored = edits  # evaluation reads the records' subjects only to skip specificity prompts about edited facts
if a.strip_subject:
    import dataclasses
    edits = [dataclasses.replace(e, subject=None) for e in edits]
model, tok = load_model("smollm2-135m")
styles = a.styles.split(",")
refs = {}
t0 = time.time()
for s in styles:
    refs[s] = unedited_reference(model, tok, scored, mode="teacher_forced" if s == "tf" else "generate", chat=s == "chat")
print("refs", round(time.time() - t0), "s", flush=True)
cfg = EditorConfig(train_chat=not a.no_chat, augment=a.augment,
                   **({} if a.negatives is None else {"negatives": a.negatives}),
                   **({} if a.lr is None else {"learning_rate": a.lr}),
                   **({} if a.stop_loss is None else {"stop_loss": a.stop_loss}),
                   **({} if a.train_dtype is None else {"train_dtype": train_dtype_option(a.train_dtype)}))
from lemoe_engine.config import LEMoEConfig
layer_cfg = {**({} if a.layer is None else {"layer": a.layer}), **({"question_gate_selects": False} if a.no_select else {})}
editor = LifelongEditor(model, tok, LEMoEConfig(**layer_cfg) if layer_cfg else None, editor_config=cfg)
t0 = time.time()
reports = editor.edit(edits, progress=False)
edit_s = time.time() - t0
import collections
print("steps", sorted(collections.Counter(r.steps for r in reports).items()), "loss", [round(r.loss, 3) for r in reports][:20], flush=True)
out = {"tag": a.tag, "layer": a.layer, "selects": editor.layer.config.question_gate_selects, "T": len(edits), "negatives": cfg.negatives, "augment": a.augment, "lr": cfg.learning_rate, "stop_loss": cfg.stop_loss, "experts": editor.layer.num_experts, "edit_s": round(edit_s, 1),
       "misrouted": sum(r.misrouted for r in reports)}
from lemoe_engine import question_gate
if a.no_question_gate:
    question_gate.disable(model)
elif a.question_gate is not None:
    question_gate.enable(model, tok, a.question_gate)
out["question_gate"] = editor.layer.config.question_gate if editor.layer.route_filter is not None else None
for s in styles:
    m = evaluate(model, tok, scored, locality_ref=refs[s], mode="teacher_forced" if s == "tf" else "generate",
                 chat=s == "chat", progress=False)
    out[s] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.as_dict().items()
              if k in ("reliability", "generality", "locality", "specificity", "leak_rate", "specificity_leak_rate")}
print(json.dumps(out), flush=True)
