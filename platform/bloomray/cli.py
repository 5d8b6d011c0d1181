"""``bloomray <verb>``: parse arguments, then call one library function per verb.

A :class:`~bloomray.errors.BloomrayError` (bad input: exit 2; failed work: exit 1) prints as
one line ``bloomray: error: <message>``; anything else is a bug and prints its full traceback
(exit 1). ``-v`` (before or after the verb) adds debug logging and the traceback of every error.

Longer than 300 lines: the parser of every verb is one table that ``--help`` prints and a
reader scans top to bottom; each verb's work is one call into the library.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from bloomray.config import ConfigError, load_config, preset_names
from bloomray.errors import BloomrayError

EPILOG = """examples:
  bloomray pretrain --config tiny-cpu --output outputs/tiny
  bloomray pretrain --config tiny-cpu --output outputs/tiny --set train.max_steps=30 --set data.path=my.txt
  bloomray pretrain --resume outputs/tiny --set train.max_steps=120
  bloomray finetune --config classify-tiny-cpu --output outputs/cls --set data.path=reviews.csv
  bloomray finetune --config sft --output outputs/sft --set data.path=chats.jsonl
  bloomray prepare-data --output data/corpus --set data.path=corpus/ --set model.path=bigscience/bloom-560m
  bloomray pretrain --config tiny-cpu --output outputs/tiny --set data.path=data/corpus
  bloomray tune --config tune-tiny-cpu --output outputs/tune --set tune.num_samples=8
  bloomray tune --resume outputs/tune
  bloomray export --checkpoint outputs/tiny/checkpoints/checkpoint_... --output exported/
  bloomray prune --model outputs/tiny/model --config tiny-cpu --output outputs/tiny-wanda --set prune.method=wanda
  bloomray demo

exit codes: 0 done; 2 bad input (config, data, tokenizer, model or checkpoint path), one line
on stderr; 1 the work failed (training, export), or a bug (full traceback); 130 interrupted.
Add -v (before or after the verb) for debug logs and the traceback of every error.
"""

VERBOSE_HELP = "debug logging, and the full traceback of every error"


def _add_set(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def _add_run_args(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument(
        "--config",
        default=default_config,
        help=f"YAML file or preset name: {', '.join(preset_names())} (default: {default_config})",
    )
    p.add_argument("--output", help="output dir (default: output.dir of the config)")
    _add_set(p, "train.lr=3e-4")
    p.add_argument(
        "--resume",
        metavar="OUTPUT_DIR",
        help="continue the interrupted run in OUTPUT_DIR from its latest checkpoint "
        "(its saved config is used; --set still applies)",
    )
    _add_address(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloomray",
        description="BLOOM training on Ray Train + DeepSpeed, pruning search on Ray Tune, serving on Ray Serve.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser(
        "pretrain",
        help="pretrain (or continue pretraining) a causal LM",
        description="Pretrain BLOOM, or continue pretraining from model.path on a domain corpus. "
        "Writes OUTPUT/{summary.json,model/,checkpoints/,logs/}.",
    )
    _add_run_args(p, "tiny-cpu")
    p.set_defaults(func=cmd_train, task="causal_lm")

    p = sub.add_parser(
        "finetune",
        help="fine-tune a classifier, an instruction (chat) model, or a causal LM",
        description="Fine-tune BLOOM for sequence classification (task=classification; reports eval "
        "accuracy and macro-F1 each epoch), on instruction data (task=sft: prompt/response or chat "
        "messages JSONL, loss on the responses) or as a causal LM.",
    )
    _add_run_args(p, "classify-tiny-cpu")
    p.set_defaults(func=cmd_train, task=None)

    p = sub.add_parser(
        "prepare-data",
        help="tokenize a corpus in parallel (Ray Data) into memory-mapped token shards",
        description="Read data.path (txt/jsonl/csv/parquet files, a folder of them, or a saved HF dataset) with "
        "Ray Data, tokenize it across the cluster with the run's tokenizer (model.path's, data.tokenizer.path, or "
        "a BPE trained on it for presets), split train/eval by document hash, and write OUTPUT/{index.json,"
        "train-*.bin,eval-*.bin,tokenizer/}. Pass OUTPUT as data.path to pretrain or finetune.",
    )
    p.add_argument("--config", default="tiny-cpu", help="YAML file or preset name (default: tiny-cpu)")
    p.add_argument("--output", required=True, help="dataset dir (on storage every node reads: NFS, a PVC)")
    _add_set(p, "data.path=corpus/")
    p.add_argument("--workers", type=int, help="tokenizer tasks at a time (default: the cluster's CPUs)")
    p.add_argument("--shard-mb", type=int, default=256, help="shard size in MiB (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output")
    _add_address(p)
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser(
        "tune",
        help="Ray Tune search over learning rate and sparsity schedules",
        description="Search tune.space (ASHA on the quality metric, failed trials retried), measure every "
        "finished trial's export, and write DIR/{trials.csv,pareto.png,lr_vs_quality.png,winner/,summary.json}.",
    )
    p.add_argument(
        "--config", default="tune-tiny-cpu", help="YAML file or preset name (default: tune-tiny-cpu)"
    )
    p.add_argument("--output", help="search dir (default: output.dir of the config)")
    _add_set(p, "tune.num_samples=8")
    p.add_argument(
        "--resume", metavar="DIR", help="continue the interrupted search in DIR with its saved config"
    )
    _add_address(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "serve",
        help="serve model dirs on Ray Serve + vLLM (OpenAI-style HTTP, continuous batching, autoscaling)",
        description="Start the Serve app of the shipped Serve config (--print-config shows it) for "
        "--model DIR on a local Ray, or attach it to a cluster with --address. Causal LMs run on vLLM (Ray Serve LLM), classifiers on transformers. "
        "API keys come from BLOOMRAY_API_KEYS_FILE or BLOOMRAY_API_KEYS (else ~/.bloomray/api_keys is "
        "created). SIGINT/SIGTERM shut Serve and Ray down and exit 0.",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="model dir to serve (repeatable; NAME=DIR serves several variants, chosen by the "
        "request's model field)",
    )
    p.add_argument("--config", default=None, help="Serve config YAML (default: the shipped one)")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the shipped Serve config and exit (edit it for `serve deploy FILE` on a cluster)",
    )
    p.add_argument("--port", type=int, help="HTTP port (default: the config's, 8000)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 only behind a load balancer)",
    )
    _add_address(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "export",
        help="consolidate a DeepSpeed checkpoint into an HF model dir",
        description="Consolidate ZeRO shards into safetensors + config + tokenizer + model card. "
        "Written to a temp dir and renamed, so a crash leaves nothing half-written.",
    )
    p.add_argument("--checkpoint", required=True, help="an OUTPUT/checkpoints/checkpoint_* dir")
    p.add_argument("--output", required=True, help="target model dir (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "prune",
        help="one-shot prune a model dir (Wanda, SparseGPT or magnitude) with calibration data",
        description="Prune prune.targets of a trained model dir to prune.final_sparsity in one shot, with "
        "prune.method wanda, sparsegpt or magnitude and prune.pattern unstructured or 2:4, calibrated on the "
        "first prune.calibration_samples train blocks of data.* (tokenized with the model dir's own tokenizer). "
        "Runs as one Ray task; writes OUTPUT as a sparse export with its model card and prints a JSON summary "
        "(sparsity per weight kind, eval loss before and after).",
    )
    p.add_argument("--model", required=True, help="the model dir to prune (an export, e.g. OUTPUT/model)")
    p.add_argument("--config", required=True, help="YAML file or preset name (data, prune, train.eval_*)")
    p.add_argument("--output", required=True, help="target model dir (must not exist unless --overwrite)")
    _add_set(p, "prune.method=sparsegpt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _add_address(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "quantize",
        help="write a W8A8 int8 copy of a model dir for vLLM (compressed-tensors format)",
        description="Quantize the transformer-block Linear weights of an export to int8 (per output channel; "
        "activations per token at run time) in the compressed-tensors format vLLM runs on CPU and GPU. "
        "`bloomray serve` does this itself with the serve arg quantize: w8a8.",
    )
    p.add_argument("--model", required=True, help="an export dir (dense or compacted)")
    p.add_argument("--output", required=True, help="target dir (must not exist)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "demo",
        help="the end-to-end demo on the embedded corpus (what `make demo` runs)",
        description="Pretrain a small BLOOM on the embedded corpus, search learning rate x structured pruning "
        "with Ray Tune, serve the compacted winner on Ray Serve + vLLM (autoscaling), send real HTTP requests, "
        "print the answers, the Pareto table and where every artifact is, and shut down. ~10 min on 2 cores.",
    )
    p.add_argument(
        "--output",
        default="outputs/demo",
        help="output dir (default: outputs/demo; replaced on the next run, and only if a demo made it)",
    )
    p.add_argument("--trials", type=int, default=4, help="Tune trials (default: 4)")
    _add_set(p, "train.max_steps=30 (the pretraining config, tiny-cpu)")
    p.set_defaults(func=cmd_demo)

    # -v after the verb too; SUPPRESS: a verb without it keeps the top-level value.
    for verb_parser in sub.choices.values():
        verb_parser.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from bloomray.export.run import run_training
    from bloomray.train.run import resume_config

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if args.resume:
        out = Path(args.resume)
        cfg = resume_config(out, overrides)
    else:
        cfg = load_config(args.config, overrides)
        out = Path(args.output or cfg.output.dir)
    if args.task and cfg.task != args.task:
        raise ConfigError(
            f"`bloomray {args.verb}` runs task={args.task}, but the config says task={cfg.task}; "
            "use `bloomray finetune` for classification and sft"
        )
    summary = run_training(cfg, out, resume=bool(args.resume))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from bloomray.data.tokens import prepare_dataset_dir

    overrides = list(args.overrides) + ([f"ray.address={args.address}"] if args.address else [])
    cfg = load_config(args.config, overrides)
    ds = prepare_dataset_dir(cfg, Path(args.output), args.workers, args.shard_mb, args.overwrite)
    splits = {s: {"documents": ds.documents(s), "tokens": ds.tokens(s)} for s in ("train", "eval")}
    print(json.dumps({"dataset": str(ds.path), **splits, "bad_rows": ds.index["bad_rows"]}, indent=2))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from bloomray.tune.driver import resume_tune, run_tune

    overrides = list(args.overrides) + ([f"ray.address={args.address}"] if args.address else [])
    if args.resume:
        summary = resume_tune(args.resume)
    else:
        cfg = load_config(args.config, overrides)
        summary = run_tune(cfg, Path(args.output or cfg.output.dir))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from bloomray.raycluster import init_ray
    from bloomray.serving.run import DEFAULT_CONFIG, serve_forever, start_server

    if args.print_config:
        print(DEFAULT_CONFIG.read_text(), end="")
        return 0
    models = {}
    for i, item in enumerate(args.model):
        name, sep, path = item.partition("=")
        models[name if sep else ("default" if i == 0 else Path(item).name)] = path if sep else item
    init_ray(args.address)
    # After ray.init: its core worker installs a SIGTERM handler that dumps a stack and aborts.
    # Until serve_forever takes over, SIGTERM interrupts the start-up as Ctrl-C does (exit 130).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    url = start_server(models or None, args.config or DEFAULT_CONFIG, args.port, args.address, host=args.host)
    return serve_forever(url)


def cmd_quantize(args: argparse.Namespace) -> int:
    from bloomray.serving.quantize import cpu_int8_caveat, quantize_w8a8

    out = quantize_w8a8(args.model, args.output)
    print(f"[quantize] wrote {out}")
    if caveat := cpu_int8_caveat():
        print(f"[quantize] note: if you serve it on this machine: {caveat}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bloomray.export.consolidate import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite)
    print(json.dumps({"model_dir": str(Path(args.output).resolve()), **info}, indent=2))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from bloomray.export.oneshot import prune_model_dir

    overrides = list(args.overrides) + ([f"ray.address={args.address}"] if args.address else [])
    cfg = load_config(args.config, overrides)
    summary = prune_model_dir(args.model, cfg, args.output, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bloomray.demo import run_demo

    run_demo(Path(args.output), args.overrides, trials=args.trials, verbose=args.verbose)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print("bloomray: interrupted", file=sys.stderr)
        return 130
    except BloomrayError as exc:  # expected: the message says what to fix (see bloomray.errors)
        if args.verbose:
            traceback.print_exc()
        print(f"bloomray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:  # noqa: BLE001 - a bug: print where it came from, never hide it
        traceback.print_exc()
        print(
            "bloomray: internal error: the traceback above shows where; please report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
