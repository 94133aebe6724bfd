"""The `maskgrpo` command: generate | pretrain | train | eval | serve-reward | bench, each with --config and
key=value overrides."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError, load_config
from .errors import RUN_FAILURES, Interrupted, keep_remote_errors, log_failure, one_line
from .preflight import OutputDirInUse
from .prompts import PromptFileError, read_prompts


EXAMPLES = {"generate": "output_dir=runs/x seed=1 sampler.steps=16", "pretrain": "output_dir=runs/x seed=1",
            "train": "output_dir=runs/x seed=1 max_steps=5 resume=auto", "eval": "output_dir=runs/x eval.samples_per_prompt=4"}
EPILOG = ("exit status: 0 done, 1 the run failed (cause and fix in the last line), 2 bad input, 130 Ctrl-C (the last "
          "line names the checkpoint and the resume=auto command)")


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error never repeats what followed a `--tok...` option (a bearer token typed
    on the command line by mistake: `--token SECRET`, `--tok=SECRET`)."""

    def error(self, message: str):
        super().error(_SECRET_OPTION.sub(r"\1\2<not shown>", message))


_SECRET_OPTION = re.compile(r"(--tok[\w-]*)(=|\s+)(\S+)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="maskgrpo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("generate", "sample images for prompts"), ("pretrain", "train the tiny base model"),
                        ("train", "Mask-GRPO training (local or on a Ray cluster)"),
                        ("eval", "GenEval-style evaluation of a checkpoint")]:
        s = sub.add_parser(name, help=help_, epilog=EPILOG)
        s.add_argument("--config", default=None, help="YAML config (see configs/; without it: the schema's defaults)")
        s.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {EXAMPLES[name]}")
        if name == "generate":
            s.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
            s.add_argument("--prompts", default=None, help="a prompt file (.txt, .jsonl, .parquet)")
            s.add_argument("--num-images", type=int, default=4, help="images per prompt")
        if name == "eval":
            s.add_argument("--checkpoint", default=None, help="checkpoint dir (default: policy.init)")
            s.add_argument("--prompts", default=None, help="GenEval metadata .jsonl (default: data.eval_prompts)")
    s = sub.add_parser("serve-reward", help="serve the config's rewards over HTTP (docs/reward_server.md)",
                       epilog="the bearer token comes from $MASKGRPO_REWARD_TOKEN or --token-file, never the command "
                              "line; clients use {name: remote, url: ..., token_env: ...}",
                       allow_abbrev=False)      # --tok must never be read as --token-file (it takes a secret)
    s.add_argument("--token", nargs="?", const="", default=None, help=argparse.SUPPRESS)   # refused, see below
    s.add_argument("--config", default=None, help="YAML config whose `rewards` are served")
    s.add_argument("--host", default=None, help="address to bind (default: reward_server.host, 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default: reward_server.port, 8377)")
    s.add_argument("--token-file", default=None, help="file holding the bearer token (else $MASKGRPO_REWARD_TOKEN)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. reward_server.max_batch=32")
    s = sub.add_parser("export",
                       help="merge a LoRA checkpoint into the family's released layout (policy.init opens it)",
                       epilog=EPILOG)
    s.add_argument("--checkpoint", required=True, help="a LoRA training checkpoint (runs/x/checkpoints/step_N)")
    s.add_argument("--out", required=True, help="a new directory for pytorch_model.safetensors + config.json")
    s.add_argument("--config", default=None, help="the run's config (default: config.yaml of the checkpoint's run)")
    s.add_argument("overrides", nargs="*", help="key=value overrides of that config, e.g. policy.init=runs/x/base")
    s = sub.add_parser("bench", help="benchmarks: maskgrpo bench WHAT [the benchmark's own options]",
                       epilog="each benchmark takes its own options (maskgrpo bench WHAT --help), not --config")
    s.add_argument("what", nargs="?", default="sampler", choices=["sampler", "learner", "rewards", "pipeline", "reward_server"],
                   help="which benchmark (default: sampler)")
    s.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to benchmarks.bench_WHAT (e.g. --sizes tiny)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 0 done, 1 the run failed (the cause and the fix in the last line), 2 bad input, 130 Ctrl-C."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted) and e.checkpoint and e.consistent:
            where = f"saved checkpoint {e.checkpoint}"
        elif isinstance(e, Interrupted) and e.checkpoint:
            where = f"the last checkpoint {e.checkpoint} is intact (steps after it run again)"
        else:
            where = "no checkpoint was saved"
        again = " ".join(["maskgrpo", args.command] + (["--config", args.config] if args.config else [])
                         + [o for o in args.overrides if not o.startswith("resume=")] + ["resume=auto"])
        step = f" at step {e.step}" if isinstance(e, Interrupted) else ""
        print(f"\nmaskgrpo: interrupted{step}; {where}. Continue with: {again}", file=sys.stderr)
        return 130
    except (ConfigError, PromptFileError) as e:
        print(f"maskgrpo: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not isinstance(e, RUN_FAILURES):
            raise
        cfg = getattr(args, "cfg", None)
        if cfg is not None and Path(cfg.output_dir).is_dir() and not isinstance(e, OutputDirInUse):
            print(f"maskgrpo: details in {log_failure(cfg.output_dir, e)}", file=sys.stderr)
        print(f"maskgrpo: {type(e).__name__}: {one_line(str(e))}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "bench":
        try:
            from benchmarks import run_benchmark
        except ModuleNotFoundError as e:
            if e.name != "benchmarks":
                raise
            print("maskgrpo bench: the benchmarks package is not installed in this environment (an install older "
                  "than it): run `bash scripts/setup.sh` again, or run from the repository root", file=sys.stderr)
            return 2
        return run_benchmark(args.what, args.bench_args)
    if args.command == "export":
        from .export import export_merged, run_config_of
        from pathlib import Path
        path = args.config or (str(run_config_of(Path(args.checkpoint))) if args.overrides else None)
        out = export_merged(load_config(path, args.overrides) if path else None, args.checkpoint, args.out)
        print(f"wrote {out} (merged LoRA weights in the family's released layout: policy.init={out} opens them)")
        return 0
    if args.command == "serve-reward" and (refused := _serve_reward_refusal(args)):
        print(f"maskgrpo serve-reward: {refused}", file=sys.stderr)
        return 2
    try:
        cfg = args.cfg = load_config(args.config, args.overrides)
        # read before anything starts: a malformed file (not UTF-8, bad JSON) is one line, exit status 2
        file_prompts = read_prompts(args.prompts) if getattr(args, "prompts", None) else []
    except (ConfigError, PromptFileError) as e:
        print(f"maskgrpo: {e}", file=sys.stderr)
        return 2
    keep_remote_errors(cfg.output_dir)
    if args.command == "generate":
        from .generate import generate
        prompts = list(args.prompt) + [it.prompt for it in file_prompts]
        if not prompts:
            print("maskgrpo generate: give --prompt TEXT (repeatable) or --prompts FILE", file=sys.stderr)
            return 2
        grid = generate(cfg, prompts, num_images=args.num_images)
        print(f"wrote {grid}")
        return 0
    if args.command == "pretrain":
        from .pretrain import pretrain
        pretrain(cfg)
        return 0
    if args.command == "train":
        from .train import train
        train(cfg)
        return 0
    if args.command == "serve-reward":
        return _serve_reward(cfg, args)
    if args.command == "eval":
        from .evaluate import evaluate_command
        evaluate_command(cfg, checkpoint=args.checkpoint, prompts=args.prompts)
        return 0
    return 1


TOKEN_ENV = "MASKGRPO_REWARD_TOKEN"


def _serve_reward_refusal(args: argparse.Namespace) -> Optional[str]:
    """Why serve-reward's command line is refused before anything loads, never repeating a value that may be the
    token; None when it is fine."""
    if args.token is not None:
        return (f"--token is refused: a token on the command line is visible to every user of this machine (ps, "
                f"/proc, shell history); export {TOKEN_ENV} or pass --token-file FILE (the value is not shown)")
    bare = [o for o in args.overrides if "=" not in o]
    if bare:
        return (f"overrides must look like key=value, e.g. reward_server.max_batch=32 ({len(bare)} argument(s) "
                f"without '=' not shown: one may be a token; export {TOKEN_ENV} or pass --token-file FILE)")
    return None


def _token_problem(token: str) -> Optional[str]:
    """Why `token` cannot be a bearer token (a character that cannot go in an HTTP header), without showing it."""
    bad = next((i for i, c in enumerate(token) if not "!" <= c <= "~"), None)
    if bad is None:
        return None
    return (f"the bearer token holds a space, control or non-ASCII character (position {bad} of {len(token)}; "
            f"the token is not shown), which no client can send in a header: use e.g. `openssl rand -hex 16`")


def _serve_reward(cfg, args: argparse.Namespace) -> int:
    import dataclasses
    import os
    from pathlib import Path

    from .config import reward_specs, section
    if args.token_file:
        path = Path(args.token_file)
        try:
            token = path.read_text().strip()
        except OSError as e:       # the path is named only if it exists: a mistyped value may be the token itself
            where = f" {args.token_file}" if path.exists() else " (no such file; the path is not shown)"
            print(f"maskgrpo serve-reward: cannot read --token-file{where}: {e.strerror}", file=sys.stderr)
            return 2
        except UnicodeDecodeError:
            print("maskgrpo serve-reward: --token-file is not UTF-8 text", file=sys.stderr)
            return 2
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        print(f"maskgrpo serve-reward: no bearer token: set {TOKEN_ENV} or pass --token-file FILE (a non-empty "
              f"file; clients send it as 'Authorization: Bearer <token>')", file=sys.stderr)
        return 2
    if problem := _token_problem(token):
        print(f"maskgrpo serve-reward: {problem}", file=sys.stderr)
        return 2
    srv = section(cfg, "reward_server")
    specs = reward_specs(cfg, cfg.rewards)
    if any([s.pop("runtime_env", None) for s in specs]):     # a list: every spec loses the key, not only the first
        print("maskgrpo serve-reward: runtime_env in a reward spec is ignored here: a reward server runs in the "
              "environment it is started in", file=sys.stderr)
    from rewards.server import serve
    options = {**dataclasses.asdict(srv), "host": args.host or srv.host,
               "port": srv.port if args.port is None else args.port}
    try:
        serve(specs, token, **options)
    except ValueError as e:          # a reward spec that cannot be built: before the server listens
        print(f"maskgrpo serve-reward: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
