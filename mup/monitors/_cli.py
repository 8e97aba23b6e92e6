"""`mup baselines`: the LLM monitors the probes are compared with, as score files.

  mup baselines prompted --model SPEC [--base-url URL] [--prompt default,single_word,...]
                         [--generative] [--eval dev] --out DIR
  mup baselines finetune --model SPEC --train NAME --val NAME [--lora-rank R] --out DIR
  mup baselines score --checkpoint DIR --dataset NAME [--dataset ...] --out DIR

writes one score file per (monitor, data set) into DIR (`mup.monitors.read_scores` reads a
folder of them) and prints AUROC and TPR at 1% FPR per data set; finetune trains the LLM as a
classifier (mup.monitors._finetune) and score writes its score files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from mup import _compile_cache
from mup._cli_args import positive_int, zero_means_none
from mup._resolve import DEFAULT_MODEL

logger = logging.getLogger(__name__)


def _templates(value: str) -> tuple[str, ...]:
    from mup.monitors._prompts import LIKELIHOOD_TEMPLATES

    if value == "all":
        return tuple(LIKELIHOOD_TEMPLATES)
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in LIKELIHOOD_TEMPLATES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown prompt template(s) {bad or value!r}; known: "
            f"{','.join(LIKELIHOOD_TEMPLATES)} (or all)"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mup baselines", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prompted",
        help="a prompted LLM monitor (likelihood templates and/or generative) as score files",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model spec; with --base-url only its tokenizer and config are read, for the "
        "prompts' token ids and the FLOPs (default %(default)s)",
    )
    p.add_argument(
        "--base-url",
        default=None,
        help="an OpenAI-compatible server with echo logprobs (mup serve, vLLM), e.g. "
        "http://127.0.0.1:8000/v1; default: score in process",
    )
    p.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY, else none")
    p.add_argument(
        "--served-model", default=None, help="the server's model name (default: its first)"
    )
    p.add_argument(
        "--prompt",
        type=_templates,
        default=None,
        help="comma-separated likelihood templates, or all (default: the model's "
        "baseline_prompt in configs/models, else single_word)",
    )
    p.add_argument("--generative", action="store_true", help="also the generative monitor")
    p.add_argument(
        "--no-likelihood", action="store_true", help="only the generative monitor (--generative)"
    )
    p.add_argument(
        "--eval",
        default="dev",
        help="evaluation sets: dev, test, or comma-separated names / files (default dev)",
    )
    p.add_argument("--data", default=None, help="data root laid out like shared/data")
    p.add_argument("--limit", type=positive_int, default=None, help="records per set (quick runs)")
    p.add_argument(
        "--max-conversation-tokens",
        type=zero_means_none,
        default=1024,
        help="keep the end of longer conversations (0 = no limit; default %(default)s)",
    )
    p.add_argument("--token-budget", type=positive_int, default=8192, help="padded tokens a batch")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default="runs/baselines", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    from mup.monitors._finetune_cli import add_parsers  # finetune, score

    add_parsers(sub)
    return parser


def _short_name(spec: str) -> str:
    from mup._configs import list_configs, load_config

    for name in list_configs("models"):
        if load_config("models", f"{name}.yaml").get("spec") == spec:
            return name
    return Path(spec).name.removesuffix(".gguf") or spec


def _default_templates(model_name: str) -> tuple[str, ...]:
    from mup._configs import list_configs, load_config

    if model_name in list_configs("models"):
        chosen = load_config("models", f"{model_name}.yaml").get("baseline_prompt")
        if chosen:
            return _templates(str(chosen))
    return ("single_word",)


def _client(args):
    import openai

    key = args.api_key or os.environ.get("OPENAI_API_KEY") or "none"
    client = openai.OpenAI(base_url=args.base_url, api_key=key, max_retries=2, timeout=600)
    served = args.served_model
    if served is None:
        try:
            served = client.models.list().data[0].id
        except openai.APIConnectionError as err:
            raise SystemExit(f"mup baselines: cannot reach {args.base_url}: {err}") from None
    return client, served


def _load_records(args) -> dict[str, list]:
    """Every evaluation set's records (binary labels), read and checked before any model."""
    from mup.data import evaluation_sets, find_dataset, load_records

    out = {}
    for name in evaluation_sets(args.eval):
        is_file = Path(name).suffix in (".jsonl", ".csv")
        path = Path(name) if is_file else find_dataset(name, args.data)
        records = list(load_records(path, binary=True))
        out[Path(name).stem if is_file else name] = records[: args.limit]
    return out


def _prompted(args) -> int:
    from tqdm import tqdm

    from mup import monitors
    from mup.monitors import _prompted as prompted

    if args.no_likelihood and not args.generative:
        raise ValueError("--no-likelihood needs --generative")  # printed as a usage error, exit 2
    sets = _load_records(args)
    model_name = _short_name(args.model)
    templates = () if args.no_likelihood else (args.prompt or _default_templates(model_name))
    kinds = [*templates, *(["generative"] if args.generative else [])]

    from mup._resolve import resolve_spec
    from mup.models import config_from_hf, read_hf_config
    from mup.text import load_tokenizer

    client = served = model = scorer = None
    if args.base_url:  # reachable? before reading anything of the model
        client, served = _client(args)
        scorer = prompted.EchoScorer(client, served)
    resolved = resolve_spec(args.model)
    config = config_from_hf(read_hf_config(resolved))
    tokenizer = load_tokenizer(resolved.path)
    if not args.base_url:
        from mup.models import load_model

        model = load_model(args.model, dtype=args.dtype)
    out = Path(args.out)
    written = []
    for kind in kinds:
        for dataset, records in sets.items():
            started = time.perf_counter()
            bar = tqdm(
                total=len(records),
                desc=f"{kind} {dataset}",
                unit="rec",
                disable=args.no_progress,
                dynamic_ncols=True,
            )
            common = dict(
                tokenizer=tokenizer,
                config=config,
                model_name=model_name,
                max_conversation_tokens=args.max_conversation_tokens,
                progress=bar.update,
            )
            if kind == "generative":
                rows = prompted.generative_rows(
                    records, dataset, model=model, client=client, served_model=served, **common
                )
            else:
                rows = prompted.likelihood_rows(
                    records,
                    dataset,
                    template=kind,
                    params=None if model is None else model.params,
                    scorer=scorer,
                    token_budget=args.token_budget,
                    **common,
                )
            bar.close()
            seconds = time.perf_counter() - started
            name = f"prompted_{model_name}_{kind}__{dataset.replace('/', '_')}.jsonl"
            written.append(monitors.write_scores(out / name, rows))
            logger.info("%s on %s: %d records in %.1f s", kind, dataset, len(rows), seconds)
            rate = len(rows) / seconds
            print(f"{kind:<14} {dataset:<16} {len(rows):>5} records  {rate:7.2f} records/s")
    _print_table(monitors.read_scores(*written))
    print(f"\nscore files in {out}")
    return 0


def _print_table(scores) -> None:
    results = scores.evaluate()
    print(f"\n{'monitor':<40} {'data set':<16} {'AUROC':>6} {'TPR@1%':>7} {'invalid':>7}")
    for monitor, per_set in results.items():
        for dataset, r in per_set.items():
            print(
                f"{monitor:<40} {dataset:<16} {r['auroc']:6.3f} {r['tpr_at_fpr']:7.3f} "
                f"{r['n_invalid']:>7}"
            )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("finetune", "score"):
        from mup.monitors._finetune_cli import run

        return run(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _compile_cache.enable()
    try:
        if args.command == "prompted":
            return _prompted(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mup baselines {args.command}: {err}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
