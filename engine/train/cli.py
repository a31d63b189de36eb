"""``engine train``, ``engine eval``, ``engine convert reference|codi`` and ``engine widen``.

- ``engine train CONFIG.yaml [--set key=value ...]``: the COCONUT curriculum (see
  ``engine.train.trainer``); runs under ``torchrun`` for DDP/FSDP.
- ``engine eval --model DIR --data FILE [--thoughts N | --latent auto|fixed|none] [--json]``:
  exact-match accuracy (the reference's comparison), mean generated tokens and thoughts,
  time. ``--data`` may be a file or a generator spec.
- ``engine convert reference CKPT --base MODEL_DIR --out DIR`` (alias ``engine
  convert-reference``): a reference checkpoint to our format.
- ``engine convert codi --checkpoint CKPT --base MODEL_DIR --out DIR --num-latent N
  --lora-alpha A [--no-eos]``: a CODI checkpoint, LoRA merged (``engine.train.convert_codi``).
- ``engine widen --from DIR --out DIR --hidden-size D --heads H --intermediate-size I``: a
  wider copy of a Llama-shaped checkpoint computing the same function
  (``engine.train.widen``), to warm-start a wider run.
"""

from __future__ import annotations

import argparse
import json
import sys


from engine.sources import add_model_arguments

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a COCONUT model (curriculum, checkpoints, metrics)",
                       description="Train with the COCONUT curriculum. CONFIG is a YAML file with the reference's "
                                   "keys (e.g. configs/reference/prosqa_coconut.yaml) plus ours.")
    p.add_argument("config", nargs="?", default=None, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable; nested: model.n_layer=4)")
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval", help="exact-match accuracy of a checkpoint on a data file",
                       description="Answer every question of --data with the engine and compare with its answer.")
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="data file (JSON/JSONL records) or generator spec")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--thoughts", type=int, default=None, help="fixed number of thoughts")
    group.add_argument("--latent", choices=["fixed", "auto", "none"], default=None,
                       help="latent policy (default: the checkpoint's)")
    p.add_argument("--max-tokens", type=int, default=128, help="answer tokens (default 128, as the reference)")
    p.add_argument("--batch-size", type=int, default=64, help="engine batch size (default 64)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--seed", type=int, default=0, help="seed for a generator spec (default 0)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_eval)

    convert = sub.add_parser("convert", help="convert another implementation's checkpoint into ours",
                             description="Convert a checkpoint of another implementation or format into a "
                                         "servable checkpoint directory.")
    kinds = convert.add_subparsers(dest="kind", metavar="KIND", required=True)
    for p in (kinds.add_parser("reference", help="facebookresearch/coconut's checkpoint_N",
                               description="Convert a torch state dict saved by the reference implementation (keys "
                                           "base_causallm.*) into a servable checkpoint directory."),
              sub.add_parser("convert-reference", help="alias of `engine convert reference`",
                             description="Alias of `engine convert reference`.")):
        p.add_argument("checkpoint", help="the reference's checkpoint file (checkpoint_N)")
        p.add_argument("--base", required=True, help="the base model directory it was trained from")
        p.add_argument("--out", required=True, help="output checkpoint directory")
        p.add_argument("--num-thoughts", type=int, default=6, help="default thoughts (ProsQA: 6)")
        p.add_argument("--c-thought", type=int, default=1, help="thoughts per reasoning step (default 1)")
        p.add_argument("--max-latent-stage", type=int, default=6, help="the last curriculum stage (default 6)")
        p.set_defaults(func=run_convert)
    p = kinds.add_parser("gguf", help="a GGUF file (llama.cpp / Ollama), dequantized",
                         description="Dequantize a GGUF file and write an ordinary checkpoint directory "
                                     "(safetensors weights, tokenizer, chat template, generation config), so a "
                                     "server does not dequantize it at every start. Needs the 'gguf' extra.")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.set_defaults(func=run_convert_gguf)
    p = kinds.add_parser("codi", help="zhenyi4/codi's saved model (LoRA + projection)",
                         description="Merge a CODI checkpoint's LoRA adapters into its base model and write a "
                                     "checkpoint served with CODI's projection and prompt layout.")
    p.add_argument("--checkpoint", required=True, help="CODI's model.safetensors or pytorch_model.bin (or "
                                                       "the directory holding it)")
    p.add_argument("--base", required=True, help="the base model directory it was trained on (e.g. gpt2)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--num-latent", type=int, required=True, help="thoughts per question (CODI's "
                                                                 "--inf_latent_iterations, e.g. 6)")
    p.add_argument("--lora-alpha", type=float, required=True, help="CODI's --lora_alpha (e.g. 32); the "
                                                                   "rank is read off the adapters")
    p.add_argument("--no-eos", action="store_true", help="no EOS around the thoughts (CODI's --remove_eos True)")
    p.set_defaults(func=run_convert_codi)

    p = sub.add_parser("widen", help="widen a Llama-shaped checkpoint, preserving its function",
                       description="Copy a checkpoint into a wider one (same head_dim, more heads, wider MLP): old "
                                   "weights in the leading blocks, new writers into the residual stream ~0, "
                                   "RMSNorm weights rescaled, so logits and continuous thoughts are unchanged.")
    p.add_argument("--from", dest="source", required=True, help="checkpoint directory to widen")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--hidden-size", type=int, required=True, help="new residual width")
    p.add_argument("--heads", type=int, required=True, help="new number of attention heads (head_dim is kept)")
    p.add_argument("--intermediate-size", type=int, required=True, help="new MLP width")
    p.add_argument("--noise", type=float, default=1e-5,
                   help="std of the new entries that write into the residual stream (default 1e-5; 0: exact)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new entries (default 0)")
    p.set_defaults(func=run_widen)


def run_convert_gguf(args: argparse.Namespace) -> int:
    from engine.gguf import convert_gguf

    out = convert_gguf(args.file, args.out, args.dtype)
    print(f"wrote {out} (serve it with: engine serve --model {out})")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from engine.train.config import load_config

    config = load_config(args.config, args.overrides)
    if config.only_eval:
        return _only_eval(config)
    from engine.train.trainer import Trainer

    summary = Trainer(config).run()
    if summary is not None:
        print(json.dumps(summary))
    return 0


def _only_eval(config) -> int:
    from pathlib import Path

    config.require("load_model_path", "val_path")
    if not Path(config.load_model_path).is_dir():
        raise ValueError(f"only_eval: load_model_path={config.load_model_path!r} must be a checkpoint directory; "
                         f"convert a reference checkpoint first with `engine convert-reference CKPT --base "
                         f"MODEL_DIR --out DIR`")
    args = argparse.Namespace(model=config.load_model_path, data=config.val_path, thoughts=None, latent=None,
                              max_tokens=config.val_max_tokens, batch_size=config.val_batch_size, limit=None,
                              seed=config.seed, device="cpu" if config.device == "auto" else config.device,
                              dtype="float32", json=False)
    return run_eval(args)


def run_eval(args: argparse.Namespace) -> int:
    from engine.data.source import resolve_source
    from engine.sync_engine import Engine
    from engine.params import LatentPolicy
    from engine.train.evaluate import evaluate

    if args.thoughts is not None and args.thoughts < 0:
        raise ValueError(f"--thoughts={args.thoughts} is invalid: expected >= 0")
    records = resolve_source(args.data, 0, args.seed)
    if args.limit:
        records = records[:args.limit]
    latent = None
    if args.thoughts is not None:
        latent = LatentPolicy(mode="fixed", thoughts=args.thoughts)
    elif args.latent is not None:
        latent = LatentPolicy(mode=args.latent)
    if args.model is None:
        from engine.models import default_model_dir

        args.model = str(default_model_dir())
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    revision=getattr(args, "revision", None),
                                    max_batch_size=args.batch_size)
    report = evaluate(engine, records, latent, max_tokens=args.max_tokens, progress=not args.json)
    if args.json:
        print(json.dumps({"model": str(args.model), "data": str(args.data), "max_tokens": args.max_tokens,
                          **report.to_dict()}))
    else:
        print(f"{args.model} on {args.data} ({report.n} questions, latent {report.latent}):")
        print(f"  accuracy        {report.accuracy:.4f} ({report.correct}/{report.n})")
        print(f"  mean tokens     {report.mean_generated_tokens:.1f}")
        print(f"  mean thoughts   {report.mean_thoughts:.2f}")
        print(f"  time            {report.seconds:.1f} s")
        if report.per_hops:
            print("  per hop count   " + ", ".join(f"{h}: {v['accuracy']:.3f} ({v['n']})"
                                                 for h, v in report.per_hops.items()))
        if report.neither_option is not None:
            print(f"  neither option  {report.neither_option:.3f}")
        for f in report.frontier or []:
            print(f"  thought {f['thought']}: mass on frontier {f['frontier_mass']:.3f}, "
                  f"one hop past {f['next_mass']:.3f}, rest {f['rest_mass']:.3f}")
    sys.stdout.flush()
    return 0


def run_widen(args: argparse.Namespace) -> int:
    from engine.train.widen import widen_checkpoint

    out = widen_checkpoint(args.source, args.out, args.hidden_size, args.heads, args.intermediate_size,
                           noise=args.noise, seed=args.seed)
    print(f"wrote {out}")
    return 0


def run_convert_codi(args: argparse.Namespace) -> int:
    from engine.train.convert_codi import convert_codi

    out = convert_codi(args.checkpoint, args.base, args.out, num_latent=args.num_latent,
                       lora_alpha=args.lora_alpha, eos=not args.no_eos)
    print(f"wrote {out}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from engine.train.convert import convert_reference

    out = convert_reference(args.checkpoint, args.base, args.out, num_thoughts=args.num_thoughts,
                            c_thought=args.c_thought, max_latent_stage=args.max_latent_stage)
    print(f"wrote {out}")
    return 0
