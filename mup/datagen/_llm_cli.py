"""`mup data label|relabel|generate|agreement`: the LLM subcommands of `mup data`.

  mup data label INPUT [INPUT ...] --out FILE|DIR
                 (--serve SPEC | --base-url URL [--model NAME])
                 [--context auto|NAME|FILE] [--rubric FILE] [--concurrency N] [--limit N]
  mup data agreement --a FILE [FILE ...] --b FILE [FILE ...] [--json FILE]

`add_parsers` adds them to the `mup data` parser and `run` runs one; every check that needs no
request (input, rubric, context, output file) is made before the endpoint is touched, and each
failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mup._cli_args import config_from_args, positive_int
from mup.datagen._endpoint import EndpointConfig, add_endpoint_args
from mup.datagen._structured import add_answer_args

COMMANDS = ("label", "relabel", "generate", "agreement")
logger = logging.getLogger(__name__)


def add_parsers(sub) -> None:
    """Add `label` and `agreement` to the subparsers `sub` of `mup data`."""
    p = sub.add_parser(
        "label",
        help="label a stakes data set with an LLM and the rubric (any OpenAI-compatible endpoint)",
        description="Label each record with an LLM that reads the stakes rubric: a 1-10 score "
        "(the expectation over the answer's token probabilities when the endpoint returns "
        "top_logprobs), a confidence, a reason, and the label they make. The output is "
        "appended record by record; a rerun continues where a run stopped.",
    )
    p.add_argument(
        "input",
        nargs="+",
        help=".jsonl/.csv files or data set names (mini, dev/mt, ...), through one endpoint",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output .jsonl (appended, resumable); with several inputs a directory of one "
        "file per input (dev/mt -> dev_mt.jsonl)",
    )
    _label_args(p)

    r = sub.add_parser(
        "relabel",
        help="label a labelled data set again, keeping its labels in labels_before",
        description="`mup data label` of one labelled data set: the output has the new labels "
        "and the old ones in labels_before (and scale_labels_before), e.g. to check the "
        "intended stakes of `mup data generate` against the rubric.",
    )
    r.add_argument("--dataset", required=True, help="a labelled .jsonl/.csv file or data set name")
    r.add_argument("--out", required=True, type=Path, help="output .jsonl (appended, resumable)")
    _label_args(r)

    g = sub.add_parser(
        "generate",
        help="generate a synthetic stakes data set: situation pairs, then prompts (any endpoint)",
        description="Draw situation specs from the factors, have an LLM write a high-stakes and "
        "a low-stakes situation for each pair (same context, different stakes), then user "
        "prompts in drawn prompt variations. Every answer is JSON validated with pydantic; "
        "invalid ones are asked again, then rejected into <out>.rejects.jsonl. The output is in "
        "the stakes schema (labels = the intended stakes) and resumable.",
    )
    g.add_argument("--out", required=True, type=Path, help="output .jsonl of prompts (resumable)")
    g.add_argument(
        "--n-situations",
        required=True,
        type=positive_int,
        help="situations in all (even: high/low pairs)",
    )
    g.add_argument("--prompts-per-situation", type=positive_int, default=2, help="K prompts (2)")
    g.add_argument(
        "--factors", default=None, help="situation factors JSON (default: the data root's)"
    )
    g.add_argument(
        "--variations", default=None, help="prompt variations JSON (default: the data root's)"
    )
    g.add_argument("--seed", type=int, default=0, help="draws and request seeds (0)")
    g.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="invalid answers asked again before an item is rejected (3)",
    )
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument(
        "--max-tokens", type=positive_int, default=320, help="a situation's answer (320)"
    )
    g.add_argument(
        "--prompt-max-tokens",
        type=positive_int,
        default=None,
        help="a prompt's answer (default: 4 a word of its length + 64)",
    )
    g.add_argument(
        "--response-format",
        default="auto",
        choices=("auto", "json_schema", "json_object", "prefix", "none"),
        help="auto: json_schema, then json_object, prefix (continue_final_message) and none, "
        "as the endpoint refuses each",
    )
    g.add_argument("--retry-rejects", action="store_true", help="ask again for rejected items")
    add_endpoint_args(g, retries_flag="--http-retries")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    a = sub.add_parser(
        "agreement",
        help="Cohen's kappa, Spearman and the confusion matrix of two labellings",
        description="Compare two labellings of the same records, joined on ids: Cohen's kappa "
        "on labels, Spearman on scale labels, and the confusion matrix. With several files, "
        "each --a file is paired with the --b file in the same position, and the pooled "
        "agreement is printed after each pair's.",
    )
    a.add_argument("--a", nargs="+", required=True, type=Path, metavar="FILE")
    a.add_argument("--b", nargs="+", required=True, type=Path, metavar="FILE")
    a.add_argument("--json", type=Path, default=None, help="also write the numbers here")


def _label_args(p) -> None:
    """The options of `label` and `relabel` after their input and --out."""
    p.add_argument("--data", default=None, help="data root for data set names (as mup.data)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N records")
    add_endpoint_args(p)
    prompt = p.add_argument_group("prompt and labels")
    prompt.add_argument("--rubric", default=None, help="rubric file (default: the data root's)")
    prompt.add_argument(
        "--context",
        default="auto",
        help="system prompt addition: none, anthropic, anthropic-extended, medical, "
        "medical-extended, a text file, or auto (by data set name: anthropic for "
        "*/anthropic, medical for */mt and */mts, else none); default auto",
    )
    prompt.add_argument("--high-threshold", type=float, default=8.0, help="high-stakes: >= (8)")
    prompt.add_argument("--low-threshold", type=float, default=3.0, help="low-stakes: <= (3)")
    prompt.add_argument(
        "--confidence-threshold",
        type=float,
        default=7.0,
        help="ambiguous below this confidence (7)",
    )
    add_answer_args(prompt, max_tokens=256, expected="the expected score")
    prompt.add_argument(
        "--max-input-chars",
        type=positive_int,
        default=None,
        help="keep only the end of longer conversations (default: all)",
    )
    prompt.add_argument(
        "--retry-rejects", action="store_true", help="ask again for the rejected records"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run `mup data label` or `mup data agreement`; 0 on success, 1 (one line on stderr) not."""
    from mup.data import DataError
    from mup.datagen._endpoint import EndpointError
    from mup.datagen._generate import GenerateError
    from mup.datagen._label import LabelError

    prog = f"mup data {args.command}"
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "relabel":
            return _relabel(args)
        return _label(args) if args.command == "label" else _agreement(args)
    except GenerateError as error:
        return _failed(
            prog,
            error,
            lambda s: (
                f"{s.n_situations_total} situations and {s.n_prompts_total} prompts are "
                f"kept in {s.out} and its side files"
            ),
        )
    except LabelError as error:
        return _failed(
            prog,
            error,
            lambda s: (
                f"{s.n_labelled_total} labelled and {s.n_rejected_total} rejected records "
                f"are kept in {s.out}"
            ),
        )
    except (EndpointError, DataError, FileNotFoundError, ValueError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished records are kept, rerun to continue", file=sys.stderr)
        return 130


def _failed(prog: str, error: Exception, kept) -> int:
    """Exit 1 for a run that stopped: the error, then what `kept(summary)` says is kept when the
    error carries the run's summary."""
    print(f"{prog}: {error}", file=sys.stderr)
    summary = getattr(error, "summary", None)
    if summary is not None:
        print(f"{prog}: {kept(summary)}; rerun to continue", file=sys.stderr)
    return 1


def _dataset(spec: str, data_root: str | None):
    from mup.data import find_dataset, is_bundled, load_records

    path = Path(spec).expanduser()
    if path.suffix.lower() in (".jsonl", ".csv"):
        if not path.is_file():
            raise FileNotFoundError(f"the input file {path} does not exist")
        return load_records(path), None
    found = find_dataset(spec, data_root)
    if is_bundled(found) and spec != "mini":
        # find_dataset falls back to the small bundled set; labelling it instead of the set
        # that was asked for would be a silent substitution.
        raise FileNotFoundError(
            f"data set {spec!r} not found (set $MUP_DATA or --data, or run `mup data download`)"
        )
    return load_records(found), spec


def _output_paths(inputs: list[str], out: Path) -> list[Path]:
    """One input: `out` is the file. Several: `out` is a folder of one file per input, named
    after it (dev/mt -> dev_mt.jsonl, a file by its stem)."""
    if len(inputs) == 1:
        if out.is_dir():
            raise ValueError(f"--out {out} is a directory; give a .jsonl file for one input")
        return [out]
    if out.suffix == ".jsonl" or out.is_file():
        raise ValueError(f"--out {out} must be a directory when labelling {len(inputs)} inputs")
    names = [
        Path(spec).stem if Path(spec).suffix.lower() in (".jsonl", ".csv") else spec
        for spec in inputs
    ]
    paths = [out / f"{name.replace('/', '_')}.jsonl" for name in names]
    if len(set(paths)) != len(paths):
        raise ValueError(f"two inputs would share an output file in {out}: {names}")
    return paths


def _label(args) -> int:
    from mup.datagen._endpoint import open_endpoint, quiet_http_logs
    from mup.datagen._label import (
        LabelConfig,
        LabelError,
        find_rubric,
        label_dataset,
        resolve_context,
    )

    quiet_http_logs()
    # Everything that needs no request first: a bad input costs nothing.
    if (args.base_url is None) == (args.serve is None):
        raise LabelError("give exactly one of --base-url URL or --serve SPEC")
    outs = _output_paths(args.input, args.out)
    datasets = [_dataset(spec, args.data) for spec in args.input]
    rubric_path = find_rubric(args.rubric)
    try:
        rubric = rubric_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LabelError(f"cannot read the rubric {rubric_path}: {error}") from None
    if not rubric.strip():
        raise LabelError(f"the rubric {rubric_path} is empty")
    configs = []
    for _, name in datasets:
        context_name, context = resolve_context(args.context, name)
        configs.append(
            config_from_args(
                LabelConfig, args, rubric=rubric, context_name=context_name, context=context
            )
        )
    endpoint_config = EndpointConfig.from_args(args)
    with open_endpoint(endpoint_config) as endpoint:
        for (dataset, _), config, out in zip(datasets, configs, outs, strict=True):
            logger.info(
                "labelling %s (%d records%s) with rubric %s, context %s, into %s",
                dataset.path,
                len(dataset),
                f", first {args.limit}" if args.limit else "",
                rubric_path,
                config.context_name,
                out,
            )
            summary = label_dataset(
                endpoint, dataset, out, config, limit=args.limit, progress=not args.no_progress
            )
            print("\n".join(summary.lines()))
        print(f"endpoint: {endpoint.usage.summary()}")
    return 0


def _relabel(args) -> int:
    """`label` of one labelled input: the labeller keeps the old labels in labels_before."""
    from mup.datagen._label import LabelError

    dataset, _ = _dataset(args.dataset, args.data)
    if all(r.label is None for r in dataset):
        raise LabelError(
            f"{dataset.path} has no labels to keep in labels_before; use mup data label"
        )
    args.input = [args.dataset]
    return _label(args)


def _generate(args) -> int:
    """Exit 2 for bad input (one line, before any request), 1 when the endpoint fails."""
    from mup.datagen._endpoint import open_endpoint, quiet_http_logs
    from mup.datagen._generate import (
        GenerateConfig,
        GenerateError,
        generate_dataset,
        load_factors,
        load_variations,
    )

    quiet_http_logs()
    prog = "mup data generate"
    try:
        if (args.base_url is None) == (args.serve is None):
            raise GenerateError("give exactly one of --base-url URL or --serve SPEC")
        if args.out.is_dir():
            raise GenerateError(f"--out {args.out} is a directory; give a .jsonl file")
        if args.max_retries < 0:
            raise GenerateError(f"--max-retries must be >= 0, got {args.max_retries}")
        factors_path, factors = load_factors(args.factors)
        variations_path, variations = load_variations(args.variations)
        config = config_from_args(
            GenerateConfig,
            args,
            factors=factors,
            variations=variations,
            factors_sha256=_sha(factors_path),
            variations_sha256=_sha(variations_path),
        )
        endpoint_config = EndpointConfig.from_args(args)
    except (GenerateError, ValueError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    logger.info(
        "generating %d situations (%d pairs) x %d prompts from %s and %s into %s",
        config.n_situations,
        config.n_pairs,
        config.prompts_per_situation,
        factors_path,
        variations_path,
        args.out,
    )
    with open_endpoint(endpoint_config) as endpoint:
        summary = generate_dataset(endpoint, config, args.out, progress=not args.no_progress)
        print("\n".join(summary.lines()))
        print(f"endpoint: {endpoint.usage.summary()}")
    return 0


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _agreement(args) -> int:
    from mup.data import load_records
    from mup.datagen._agreement import agreement, pooled_agreement

    if len(args.a) != len(args.b):
        raise ValueError(
            f"--a has {len(args.a)} files and --b {len(args.b)}: each --a file is paired with "
            "the --b file in the same position"
        )
    for path in [*args.a, *args.b]:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
    pairs = [(load_records(a), load_records(b)) for a, b in zip(args.a, args.b, strict=True)]
    results = {}
    for (a, b), a_path, b_path in zip(pairs, args.a, args.b, strict=True):
        result = agreement(a, b)
        results[f"{a_path} vs {b_path}"] = result
        print(f"a: {a_path}\nb: {b_path}")
        print("\n".join(result.lines()) + "\n")
    if len(pairs) > 1:
        result = pooled_agreement(pairs)
        results["pooled"] = result
        print(f"pooled over {len(pairs)} pairs")
        print("\n".join(result.lines()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({k: v.as_dict() for k, v in results.items()}, indent=2) + "\n"
        )
    return 0
