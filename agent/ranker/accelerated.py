"""Train the ranker on another machine (an accelerator's) from ``recagent train ranker --export DIR``.

    python -m agent.ranker.accelerated DIR OUT [--minutes 8] [--batch-size 32] [--lr 3e-4] [--eval-every 50]
        [--lora-r 8] [--targets q_proj,v_proj] [--top-layers 10] [--max-steps N] [--device cuda]

The export holds the encoded training and validation examples, the recipe and the base model, so this needs
only torch, transformers, peft, numpy, scipy, tqdm and (for a GGUF base) ``gguf``: none of the serving stack.
The loop is :func:`agent.ranker.loop.train_loop`, the one ``recagent train ranker`` runs here. Writes
``OUT/best/`` (the adapter kept by validation NDCG@10) and ``OUT/run.json``; then, back where the index is,
``recagent train ranker --from-run OUT`` chooses alpha and the serving window on the validation users, scoring
them as serving does, and installs the ranker with its provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.ranker.loop import Encoded, LoopConfig, train_loop

EXAMPLES = "examples.pt"
RECIPE = "recipe.json"
RUN_RECORD = "run.json"


def load_base(export: Path, recipe: dict[str, Any], device: Any) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = recipe["base"]
    dtype = getattr(torch, recipe.get("dtype", "bfloat16"))  # the served model's, recorded by the export
    if "gguf" in base:
        from agent.llm.gguf_state import gguf_state_dict

        config = AutoConfig.from_pretrained(str(export / "config"))
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        missing, unexpected = model.load_state_dict(gguf_state_dict(export / base["gguf"], dtype), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(f"the GGUF does not fit the model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(export / base["folder"]), dtype=dtype)
    return model.to(device)


def apply_overrides(recipe: dict[str, Any], args: argparse.Namespace, n_layers: int) -> dict[str, Any]:
    """The recipe with the command line's changes, in all three places it is recorded."""
    recipe = json.loads(json.dumps(recipe))
    loop, lora, cfg = recipe["loop"], recipe["lora"], recipe["recipe"]
    for key, value in (("max_minutes", args.minutes), ("batch_size", args.batch_size), ("lr", args.lr),
                       ("eval_every", args.eval_every), ("max_steps", args.max_steps)):
        if value is not None:
            loop[key] = cfg[key] = value
    if args.lora_r is not None:
        lora["r"] = cfg["lora_r"] = args.lora_r
        lora["lora_alpha"] = cfg["lora_alpha"] = 2 * args.lora_r
    if args.targets is not None:
        lora["target_modules"] = cfg["target_modules"] = [t for t in args.targets.split(",") if t]
    if args.top_layers is not None:
        cfg["top_layers"] = args.top_layers
        lora["layers_to_transform"] = list(range(max(0, n_layers - args.top_layers), n_layers))
    return recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.ranker.accelerated", description=__doc__.split("\n")[0])
    parser.add_argument("export", type=Path, help="folder written by `recagent train ranker --export`")
    parser.add_argument("out", type=Path, help="output folder (best/ and run.json)")
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--lora-r", type=int, help="LoRA rank (its alpha is set to twice the rank)")
    parser.add_argument("--targets", help="comma-separated module names, e.g. q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--top-layers", type=int)
    parser.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    if not (args.export / RECIPE).exists() or not (args.export / EXAMPLES).exists():
        parser.error(f"{args.export} is not an export: it needs {RECIPE} and {EXAMPLES} "
                     "(`recagent train ranker --export DIR`)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    recipe = json.loads((args.export / RECIPE).read_text())
    data = torch.load(args.export / EXAMPLES, weights_only=False)
    train = [Encoded(**e) for e in data["train"]]
    val = [Encoded(**e) for e in data["val"]]
    model = load_base(args.export, recipe, device)
    recipe = apply_overrides(recipe, args, int(model.config.num_hidden_layers))
    model = get_peft_model(model, LoraConfig(**recipe["lora"]))
    where = (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}" if str(device).startswith("cuda")
             else f"{platform.machine()} cpu, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp)
        result = train_loop(model, train, val, LoopConfig(**recipe["loop"]), int(recipe["marker_id"]), ckpt,
                            device=device, progress=not args.quiet)
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(args.out / "best", ignore_errors=True)
        shutil.copytree(ckpt / "best", args.out / "best")
    (args.out / "best" / "README.md").unlink(missing_ok=True)
    (args.out / RUN_RECORD).write_text(json.dumps({"recipe": recipe, "result": dataclasses.asdict(result),
                                                   "machine": where, "device": str(device),
                                                   "command": " ".join(["python -m agent.ranker.accelerated",
                                                                        *(argv or sys.argv[1:])])}, indent=1))
    sys.stderr.write(f"kept step {result.kept_step}: validation {max(result.log, key=lambda r: r['best_fused'])}; "
                     f"{result.seen} examples in {result.seconds:.0f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
