"""The `vlm` command: the table `COMMANDS`, each command a function whose typed signature is its arguments.

A command's positional parameters are its positional arguments and its keyword-only parameters its options
(help from the ``Args:`` of its docstring); a parameter typed as `DecodingConfig` or `MapConfig` adds that
dataclass's fields as options (help from each field's docstring); ``config: TrainConfig`` adds the training
config's ``--section.key`` options and ``--config FILE.yaml`` (jsonargparse). Only the chosen command's parser is
built and each command imports the library when it runs, so ``vlm --help`` and ``vlm caption --help`` import
no torch.

Option names take ``-`` or ``_`` alike (``--top-k``, ``--top_k``); `ALIASES` keeps older spellings working. Every
problem with the user's input ends in one line on stderr naming the file, field or value, and a non-zero exit (2
for a bad command line, 1 otherwise); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable
from json import dumps
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from vlm.config import DecodingConfig, MapConfig, TrainConfig
from vlm.errors import VLMError

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

ALIASES = {"beam_size": ["--beam"], "no_repeat_ngram_size": ["--no-repeat-ngram"]}
"""Older spellings of options, still accepted and listed in the help."""


# ------------------------------------------------------------------------------------------------ the commands


def train(config: TrainConfig, *, out: str = "runs/default", resume: str | None = None,
          init: str | None = None) -> None:
    """Train a captioner (default: on the built-in scenes); --print_config shows the resolved config.

    Args:
        out: Output directory.
        resume: Continue a run from a checkpoint: a .ckpt path, or last (OUT/checkpoints/last.ckpt).
        init: Start from these weights (exported model or .ckpt), with their model config and tokenizer; SCST
            (scst.enabled) needs it.
    """
    from vlm.train.run import train as fit

    model_dir = fit(config, out, resume=resume, init=init)
    if model_dir is not None:  # rank 0
        print(f"exported model: {model_dir}")


def caption(images: list[str], *, model: str, decoding: DecodingConfig, json: bool = False) -> None:
    """Caption images.

    Args:
        images: Image files.
        model: Exported model directory or Lightning .ckpt.
        json: One JSON object per line.
    """
    from vlm.api import load

    captions = load(model).caption(images, decoding)
    for image, text in zip(images, captions, strict=True):
        print(dumps({"image": image, "caption": text}) if json else text)


def ask(image: str, question: str, *, model: str, decoding: DecodingConfig, json: bool = False) -> None:
    """Answer a question about an image.

    Args:
        image: Image file.
        question: The question.
        model: Exported model directory or Lightning .ckpt.
        json: Print a JSON object.
    """
    from vlm.api import load

    answer = load(model).ask([image], [question], decoding)[0]
    print(dumps({"image": image, "question": question, "answer": answer}) if json else answer)


def attend(image: str, *, model: str, out: str, question: str | None = None, decoding: DecodingConfig,
           maps: MapConfig) -> None:
    """Write per-token attention overlays for a caption or an answer.

    Args:
        image: Image file.
        model: Exported model directory or Lightning .ckpt.
        out: Output directory.
        question: Answer this question instead of captioning.
    """
    from vlm.api import load

    result = load(model).attend(image, question=question, decoding=decoding, maps=maps)
    written = result.save(out)
    print(result.text)
    print(f"wrote {len(written['files'])} token overlays, grid.png and attention.json to {out}")


def evaluate(*, model: str | None = None, results: str | None = None, data: str | None = None,
             images: str | None = None, format: str = "auto", annotations: str | None = None,
             split: str | None = None, limit: int | None = None, num_scenes: int = 500, decoding: DecodingConfig,
             maps: MapConfig, java: bool = True, out: str | None = None, report: str | None = None) -> None:
    """Score a model or a results file on a dataset (default: held-out built-in scenes); prints metrics as JSON.

    Args:
        model: Exported model directory or Lightning .ckpt.
        results: Score this results file (COCO captions or VQA answers) instead of a model.
        data: Annotation file (COCO, Karpathy, VQA questions, JSONL).
        images: Image folder of --data.
        format: auto, coco, karpathy, vqa or jsonl.
        annotations: VQA v2 annotations file (answers).
        split: Karpathy split: train, val or test.
        limit: Score only the first N images.
        num_scenes: Held-out scenes to score (no --data).
        java: Also run METEOR (and SPICE if installed) when java is found.
        out: With --data: output directory for result files, metrics.json and per_image.csv (default: eval_out);
            without: also write the metrics JSON to this file.
        report: Also write an HTML report with maps to this file.
    """
    from vlm.api import load

    if data is None:
        from vlm.eval.builtin import evaluate_builtin

        if model is None:
            raise VLMError("--model: needed to score the built-in scenes (or give --results with --data)")
        if num_scenes < 1:
            raise VLMError(f"--num-scenes: expected a positive number of scenes, got {num_scenes}")
        metrics = evaluate_builtin(load(model), num_scenes=num_scenes, decoding=decoding, maps=maps)
        text = dumps(metrics, indent=2)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text)
        print(text)
        return
    from vlm.config import SourceConfig
    from vlm.eval.run import evaluate_data

    source = SourceConfig(path=data, format=format, images=images, annotations=annotations, split=split)
    metrics, written = evaluate_data(source, load(model) if model is not None else None, results=results,
                                     decoding=decoding, maps=maps, limit=limit, java=java, out=out or "eval_out",
                                     report=report)
    print(dumps(metrics, indent=2))
    for note in (f"{name} {why}" for name, why in metrics.get("caption", {}).get("skipped", {}).items()):
        print(f"note: {note}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)


def ground(image: str, phrase: str, *, model: str, out: str | None = None, maps: MapConfig,
           threshold: float = 0.5) -> None:
    """Find a phrase in an image: its map, a box, an overlay PNG and JSON.

    Args:
        image: Image file.
        phrase: The phrase to find, e.g. 'a red circle'.
        model: Exported model directory or Lightning .ckpt.
        out: Write ground.png (the box drawn on the overlay) here.
        threshold: The box encloses the peak's region above this fraction of the peak.
    """
    from vlm.api import load
    from vlm.grounding.ground import ground as find

    print(dumps(find(load(model), image, phrase, maps, threshold=threshold, out_dir=out), indent=2))


def demo(*, model: str, out: str = "runs/demo") -> None:
    """Show what a model learned: captions, answers and an overlay.

    Args:
        model: Exported model directory or Lightning .ckpt.
        out: Where to write the overlays.
    """
    from vlm.api import load
    from vlm.data.scenes import make_scene

    captioner = load(model)
    scenes = [make_scene(i, "val", image_size=captioner.model.cfg.encoder.image_size) for i in range(4)]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, text) in enumerate(zip(scenes, captioner.caption([s.image for s in scenes]), strict=True)):
        path = folder / f"scene{i}.png"
        scene.image.save(path)
        print(f"{path}: {text}")
        questions = scene.questions[:3]
        for q, a in zip(questions, captioner.ask([scene.image] * len(questions), [q.question for q in questions]),
                        strict=True):
            print(f"    Q: {q.question}  A: {a}  (truth: {q.answer})")
    result = captioner.attend(scenes[0].image)
    result.save(folder / "attention")
    print(f"attention overlays of '{result.text}': {folder / 'attention' / 'grid.png'}")


def serve(*, model: str, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 20.0,
          max_pixels: int | None = None) -> None:
    """Serve a model: a web page and a JSON API (caption, ask, attend, ground).

    Args:
        model: Exported model directory or Lightning .ckpt.
        host: Address to bind (default: this machine only).
        port: Port to listen on.
        max_upload_mb: Largest accepted upload, in MiB.
        max_pixels: Largest accepted image, in pixels (default: $VLM_MAX_PIXELS or the loader's limit).
    """
    import uvicorn

    from vlm.api import load
    from vlm.serve import create_app

    app = create_app(load(model), max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels)
    print(f"serving {model} on http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def data_shapes(*, out: str, num_images: int = 100, split: str = "val", image_size: int = 64, seed: int = 0) -> None:
    """Write built-in scenes as COCO captions and instances, VQA v2, Karpathy, JSONL and WebDataset shards.

    Args:
        out: Output directory.
        num_images: Scenes to write.
        split: Scene split: train or val.
        image_size: Image side in pixels.
        seed: Scene generator seed.
    """
    from vlm.data.export import write_shapes

    for layout, path in write_shapes(out, num_images, split=split, seed=seed, image_size=image_size).items():
        print(f"{layout:12s} {path}")


def data_validate(path: str, *, images: str | None = None, annotations: str | None = None, format: str = "auto",
                  split: str | None = None, max_words: int = 60, json: bool = False) -> None:
    """Check a dataset: counts, unreadable images, empty or over-long texts, answers; exits non-zero on problems.

    Args:
        path: Annotation file, JSONL file or WebDataset shards.
        images: Image folder (COCO, Karpathy, VQA).
        annotations: VQA v2 annotations file (answers).
        format: auto, coco, karpathy, vqa, jsonl or webdataset.
        split: Karpathy split: train, val or test.
        max_words: Longer texts are reported.
        json: Print the report as JSON.
    """
    from vlm.config import SourceConfig
    from vlm.data.validate import validate

    report = validate(SourceConfig(path, format, images, annotations, split), max_words=max_words)
    if json:
        print(dumps(report, indent=2))
    else:
        print(f"{report['path']} ({report['format']}): {report.get('images', 0)} images, "
              f"{report.get('captions', 0)} captions, {report.get('questions', 0)} questions, "
              f"{report.get('regions', 0)} regions")
        if report["top_answers"]:
            print("top answers: " + ", ".join(f"{a} ({n})" for a, n in report["top_answers"]))
        for problem in report["problem_list"]:
            print(f"problem: {problem}")
    if not report["ok"]:
        raise VLMError(f"{report['path']}: {report['problems']} problem(s) found")


class Group(NamedTuple):
    """A command with subcommands of its own."""

    help: str
    commands: dict[str, Callable[..., None]]


COMMANDS: dict[str, Callable[..., None] | Group] = {
    "train": train,
    "caption": caption,
    "ask": ask,
    "attend": attend,
    "eval": evaluate,
    "ground": ground,
    "demo": demo,
    "serve": serve,
    "data": Group("Write the built-in scenes as datasets, or check a dataset.",
                  {"shapes": data_shapes, "validate": data_validate}),
}
"""Every `vlm` command, once: its name and the function that runs it."""


# ------------------------------------------------------------------------------ parsers from the signatures

OPTION_GROUPS = (DecodingConfig, MapConfig)
"""Dataclasses whose fields become a command's options when one of its parameters has their type."""


def _summary(command: Callable[..., None] | Group) -> str:
    return command.help if isinstance(command, Group) else command.__doc__.splitlines()[0]


def usage() -> str:
    """The `vlm --help` text, from the table."""
    lines = ["usage: vlm {" + ",".join(COMMANDS) + "} ... [--debug]", ""]
    lines += [f"  {name:8s} {_summary(command)}" for name, command in COMMANDS.items()]
    lines += ["", "vlm COMMAND --help lists its options; --debug shows a traceback instead of a one-line error."]
    return "\n".join(lines) + "\n"


def _option_names(name: str) -> list[str]:
    dashed = name.replace("_", "-")
    return [f"--{name}", *([f"--{dashed}"] if dashed != name else []), *ALIASES.get(name, [])]


def _add_option(parser: ArgumentParser | argparse._ArgumentGroup, name: str, hint: typing.Any, default: typing.Any,
                doc: str | None) -> None:
    """``--name`` (a switch when it is a bool that is off by default, as ``--json``; else it takes a value)."""
    if hint is bool and default is False:
        parser.add_argument(*_option_names(name), action="store_true", help=doc)
    else:
        required = default is inspect.Parameter.empty
        parser.add_argument(*_option_names(name), type=hint, default=None if required else default,
                            required=required, help=doc)


def build_parser(prog: str, command: Callable[..., None] | Group) -> ArgumentParser:
    """The parser of one command (or of a group's subcommands), from its function's signature and docstrings.

    jsonargparse is imported here, not with this module: ``vlm --help`` needs none of it.
    """
    import docstring_parser
    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # a config field's docstring: its option's help

    class _HelpFormatter(DefaultHelpFormatter):
        """Lists an option's spellings once, then its value: ``--top_k, --top-k TOP_K``."""

        def _format_action_invocation(self, action: argparse.Action) -> str:
            if len(action.option_strings) < 2 or action.nargs == 0:
                return super()._format_action_invocation(action)
            return f"{', '.join(action.option_strings)} {self._format_args(action, action.dest.upper())}"

    if isinstance(command, Group):
        parser = ArgumentParser(prog=prog, description=command.help, exit_on_error=False, allow_abbrev=False,
                                formatter_class=_HelpFormatter)
        subcommands = parser.add_subcommands(dest="action")
        for name, sub in command.commands.items():
            subcommands.add_subcommand(name, build_parser(f"{prog} {name}", sub), help=_summary(sub))
        return parser
    doc = docstring_parser.parse(command.__doc__)
    params = inspect.signature(command).parameters
    parser = ArgumentParser(prog=prog, description=doc.description, exit_on_error=False, allow_abbrev=False,
                            formatter_class=_HelpFormatter,
                            epilog=None if "config" in params else "Option names take - or _ alike (--top-k, --top_k).")
    helps = {p.arg_name: p.description for p in doc.params}
    hints = typing.get_type_hints(command)
    for param in params.values():
        hint = hints[param.name]
        if param.name == "config":
            parser.add_argument("--config", action=ActionConfigFile, help="YAML config file (its keys as below).")
            parser.add_class_arguments(hint, None, as_group=False)
        elif hint in OPTION_GROUPS:
            fields_doc = docstring_parser.parse_from_object(hint)
            group = parser.add_argument_group(fields_doc.short_description.rstrip("."))
            field_helps = {p.arg_name: p.description for p in fields_doc.params}
            field_hints = typing.get_type_hints(hint)
            for f in dataclasses.fields(hint):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                _add_option(group, f.name, field_hints[f.name], default, field_helps.get(f.name))
        elif param.kind is param.KEYWORD_ONLY:
            _add_option(parser, param.name, hint, param.default, helps.get(param.name))
        else:
            parser.add_argument(param.name, nargs="+" if typing.get_origin(hint) is list else None,
                                help=helps.get(param.name))
    return parser


def _call(command: Callable[..., None], args: Namespace) -> None:
    """Run the command with the parsed arguments, the option groups and the training config as dataclasses."""
    hints = typing.get_type_hints(command)
    kwargs = {}
    for name in inspect.signature(command).parameters:
        hint = hints[name]
        if name == "config" or hint in OPTION_GROUPS:
            try:
                kwargs[name] = hint(**{f.name: args[f.name] for f in dataclasses.fields(hint)})
            except ValueError as e:  # an option out of range (the dataclass checks its fields)
                raise VLMError(str(e)) from None
        else:
            kwargs[name] = args[name]
    command(**kwargs)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vlm: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    try:
        parser = build_parser(f"vlm {name}", command)
        args = parser.instantiate(parser.parse_args(rest))
        if isinstance(command, Group):
            _call(command.commands[args.action], args[args.action])
        else:
            _call(command, args)
    except Exception as e:  # VLMError: bad input; ArgumentError: a bad command line; anything unexpected
        if debug:
            raise
        message = " ".join(str(e).split()) or e.__class__.__name__
        print(f"vlm {name}: error: {message}", file=sys.stderr)
        return 2 if isinstance(e, argparse.ArgumentError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
