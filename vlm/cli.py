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
import socket
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
        init: Start from these weights (exported model, .ckpt or hf:NAME_OR_DIR), with their model config and
            tokenizer; SCST (scst.enabled) needs it.
    """
    from vlm.train.run import train as fit

    model_dir = fit(config, out, resume=resume, init=init)
    if model_dir is not None:  # rank 0
        print(f"exported model: {model_dir}")


def caption(images: list[str], *, model: str, decoding: DecodingConfig, json: bool = False,
            runtime: str = "torch", prompt: str | None = None) -> None:
    """Caption images: one line per caption, image after image (--num_samples K: K lines per image).

    Args:
        images: Image files.
        json: One JSON object per caption ("image", "caption"; with --num_samples K > 1 also "sample", 0 to K-1).
        prompt: Text the caption continues, e.g. 'a picture of' (the caption printed begins with it).
    """
    from vlm.api import load

    captions = load(model, runtime=runtime).caption(images, decoding, prompt=prompt)
    for image, sample, text in _samples(images, captions, decoding):
        print(dumps({"image": image, **sample, "caption": text}) if json else text)


def ask(image: str, question: str, *, model: str, decoding: DecodingConfig, json: bool = False,
        runtime: str = "torch") -> None:
    """Answer a question about an image (--num_samples K: K answers, one a line).

    Args:
        image: Image file.
        question: The question.
        json: One JSON object per answer ("image", "question", "answer"; with --num_samples K > 1 also "sample").
    """
    from vlm.api import load

    answers = load(model, runtime=runtime).ask([image], [question], decoding)
    for _, sample, answer in _samples([image], answers, decoding):
        print(dumps({"image": image, "question": question, **sample, "answer": answer}) if json else answer)


def _samples(images: list[str], texts: list[str], decoding: DecodingConfig) -> list[tuple[str, dict, str]]:
    """(image, {"sample": k} or {}, text) of each text the API returned for the images: num_samples K per image,
    image after image. The sample index is there only when K > 1, so one text per image prints as it always did."""
    k = decoding.num_samples
    return [(images[i // k], {"sample": i % k} if k > 1 else {}, text) for i, text in enumerate(texts)]


def attend(image: str, *, model: str, out: str, question: str | None = None, decoding: DecodingConfig,
           maps: MapConfig, runtime: str = "torch", prompt: str | None = None) -> None:
    """Write per-token attention overlays for a caption or an answer.

    Args:
        image: Image file.
        out: Output directory.
        question: Answer this question instead of captioning.
        prompt: Text the caption continues, e.g. 'a picture of' (maps are drawn for the words after it).
    """
    from vlm.api import load

    result = load(model, runtime=runtime).attend(image, question=question, decoding=decoding, maps=maps,
                                                 prompt=prompt)
    written = result.save(out)
    print(result.text)
    print(f"wrote {len(written['files'])} token overlays, grid.png and attention.json to {out}")


def evaluate(*, model: str | None = None, results: str | None = None, data: str | None = None,
             images: str | None = None, format: str = "auto", annotations: str | None = None,
             split: str | None = None, limit: int | None = None, num_scenes: int = 500, scenes: str = "shapes",
             decoding: DecodingConfig,
             maps: MapConfig, java: bool = True, out: str | None = None, report: str | None = None,
             runtime: str = "torch") -> None:
    """Score a model or a results file on a dataset (default: held-out built-in scenes); prints metrics as JSON.

    Args:
        results: Score this results file (COCO captions or VQA answers) instead of a model.
        data: Annotation file (COCO, Karpathy, VQA questions, JSONL).
        images: Image folder of --data.
        format: auto, coco, karpathy, vqa or jsonl.
        annotations: VQA v2 annotations file (answers).
        split: Karpathy split: train, val or test.
        limit: Score only the first N images.
        num_scenes: Held-out scenes to score (no --data).
        scenes: Family of the held-out scenes (no --data): shapes, relational or mixed (data.scenes).
        java: Also run METEOR (and SPICE if installed) when java is found.
        out: With --data: output directory for result files, metrics.json and per_image.csv (default: eval_out);
            without: also write the metrics JSON to this file.
        report: Also write an HTML report with maps to this file.
    """
    from vlm.api import load

    if data is None:
        from vlm.eval.builtin import evaluate_builtin

        needing = [f"--{name}" for name, value in (("results", results), ("report", report), ("limit", limit),
                                                    ("images", images), ("annotations", annotations),
                                                    ("split", split)) if value is not None]
        if needing:  # not silently ignored
            raise VLMError(f"{needing[0]}: needs --data (without it the built-in scenes are scored)")
        if model is None:
            raise VLMError("--model: needed to score the built-in scenes (or give --results with --data)")
        if num_scenes < 1:
            raise VLMError(f"--num-scenes: expected a positive number of scenes, got {num_scenes}")
        metrics = evaluate_builtin(load(model, runtime=runtime), num_scenes=num_scenes, decoding=decoding, maps=maps,
                                   scenes=scenes)
        text = dumps(metrics, indent=2)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text)
        print(text)
        _print_notes(metrics)
        return
    from vlm.config import SourceConfig
    from vlm.eval.run import evaluate_data

    source = SourceConfig(path=data, format=format, images=images, annotations=annotations, split=split)
    captioner = load(model, runtime=runtime) if model is not None else None
    metrics, written = evaluate_data(source, captioner, results=results,
                                     decoding=decoding, maps=maps, limit=limit, java=java, out=out or "eval_out",
                                     report=report)
    print(dumps(metrics, indent=2))
    _print_notes(metrics)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)


def _print_notes(metrics: dict) -> None:
    """What `vlm eval` left out, and why: a metric that needs Java or models it lacks, grounding without maps."""
    notes = dict((metrics.get("caption") or {}).get("skipped", {}))
    if (metrics.get("grounding") or {}).get("skipped"):
        notes["grounding"] = metrics["grounding"]["skipped"]
    for name, why in notes.items():
        print(f"note: {name} {why}", file=sys.stderr)


def predict(*, model: str, input: str, out: str, question: list[str] | None = None, task: str | None = None,
            decoding: DecodingConfig, maps: bool = False, map_config: MapConfig, map_top_k: int = 5,
            threshold: float = 0.5, batch_size: int = 16, num_workers: int | None = None, chunk_size: int = 1000,
            input_format: str = "auto", format: str = "jsonl", max_pixels: int | None = None,
            accelerator: str = "auto", devices: str = "auto", num_nodes: int = 1, strategy: str = "auto",
            precision: str = "32-true", progress_every: int = 50, prompt: str | None = None,
            runtime: str = "torch") -> None:
    """Caption and question a whole collection on any number of processes, resumably, with per-token evidence.

    Args:
        input: A folder (recursive), a glob, a text file of paths, a JSONL file ("image", optional "key" and
            "phrases", other fields carried) or WebDataset shards (path, {000..009} pattern, URL).
        out: Output directory: one file per chunk, manifest.json, errors.jsonl; rerun to resume.
        question: A question to answer about every image (repeat the option for several).
        task: caption, questions or both (default: caption, plus the questions when given).
        maps: Write each token's top patches and a box per phrase (as vlm attend and vlm ground make them).
        map_top_k: Patches kept per token map.
        threshold: A phrase's box encloses its peak's region above this fraction of the peak (as vlm ground).
        batch_size: Images per batch (per process).
        num_workers: Data-loader workers per process (default: its share of the cores), reading and resizing
            images; on the CPU each also runs the model, one thread each (0: all in the main process, one thread).
        chunk_size: Images per output file for a listed input (a shard input writes one file per shard).
        input_format: auto, folder, glob, list, jsonl or webdataset.
        format: jsonl, parquet or webdataset (new shards: images, original alt-text, the new caption as
            "vlm_caption" in the .json).
        max_pixels: Largest accepted image, in pixels (default: $VLM_MAX_PIXELS or the loader's limit).
        accelerator: cpu, gpu, mps or auto.
        devices: Devices per node (a number, or auto).
        num_nodes: Machines to run on.
        strategy: Lightning strategy: auto, ddp, ...
        precision: Lightning precision, e.g. bf16-mixed.
        progress_every: Batches between progress lines when stdout is not a terminal.
        prompt: Text each caption continues, e.g. 'a picture of' (the caption written begins with it).
    """
    from vlm.predict import predict as run

    summary = run(model, input, out, questions=question or [], task=task, decoding=decoding, maps=maps,
                  map_config=map_config, top_k=map_top_k, threshold=threshold, batch_size=batch_size,
                  num_workers=num_workers, chunk_size=chunk_size, input_format=input_format, format=format,
                  max_pixels=max_pixels, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                  strategy=strategy, precision=precision, progress_every=progress_every, prompt=prompt,
                  runtime=runtime)
    if summary is not None:  # the first process
        errors = f", {summary['errors_this_run']} unreadable (see {Path(out) / 'errors.jsonl'})"
        print(f"predicted {summary['records_this_run']} images in {summary['chunks_this_run']} chunks"
              f"{errors if summary['errors_this_run'] else ''}; {summary['chunks_skipped']} chunks already done; "
              f"{summary['records']} records in {summary['chunks']}/{summary['chunks_total']} chunks in {out}; "
              f"{summary['images_per_s']} images/s")


def ground(image: str, phrase: str, *, model: str, out: str | None = None, maps: MapConfig,
           threshold: float = 0.5, runtime: str = "torch") -> None:
    """Find a phrase in an image: its map, a box, an overlay PNG and JSON.

    Args:
        image: Image file.
        phrase: The phrase to find, e.g. 'a red circle'.
        out: Write ground.png (the box drawn on the overlay) here.
        threshold: The box encloses the peak's region above this fraction of the peak.
    """
    from vlm.api import load
    from vlm.grounding.ground import ground as find

    print(dumps(find(load(model, runtime=runtime), image, phrase, maps, threshold=threshold, out_dir=out), indent=2))


def demo(*, model: str, out: str = "runs/demo", runtime: str = "torch") -> None:
    """Show what a model learned: captions, answers and an overlay.

    Args:
        out: Where to write the overlays.
    """
    from vlm.api import NO_MAPS, load
    from vlm.data.scenes import make_scene

    captioner = load(model, runtime=runtime)
    scenes = [make_scene(i, "val", image_size=captioner.model.cfg.encoder.image_size) for i in range(4)]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, text) in enumerate(zip(scenes, captioner.caption([s.image for s in scenes]), strict=True)):
        path = folder / f"scene{i}.png"
        scene.image.save(path)
        print(f"{path}: {text}")
        if not captioner.model.cfg.answers_questions:  # an imported captioner: no questions
            continue
        questions = scene.questions[:3]
        for q, a in zip(questions, captioner.ask([scene.image] * len(questions), [q.question for q in questions]),
                        strict=True):
            print(f"    Q: {q.question}  A: {a}  (truth: {q.answer})")
    if not captioner.makes_maps:
        print(f"note: attention overlays {NO_MAPS}", file=sys.stderr)
        return
    result = captioner.attend(scenes[0].image)
    result.save(folder / "attention")
    print(f"attention overlays of '{result.text}': {folder / 'attention' / 'grid.png'}")


def serve(*, model: str, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 20.0,
          max_pixels: int | None = None, runtime: str = "torch") -> None:
    """Serve a model: a web page and a JSON API (caption, ask, attend, ground).

    Args:
        host: Address to bind (default: this machine only).
        port: Port to listen on.
        max_upload_mb: Largest accepted upload, in MiB.
        max_pixels: Largest accepted image, in pixels (default: $VLM_MAX_PIXELS or the loader's limit).
    """
    import uvicorn

    from vlm.api import load
    from vlm.serve import create_app

    app = create_app(load(model, runtime=runtime), max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    with _listen(host, port) as sock:  # bound here, so that a busy port is our one-line error, not uvicorn's exit
        print(f"serving {model} on http://{host}:{sock.getsockname()[1]}/", flush=True)  # port 0: the one chosen
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down and raised it again
            pass
        except SystemExit:  # uvicorn's startup failed (it logged why)
            raise VLMError(f"cannot serve on {host}:{port}: the server did not start") from None


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6, as the host resolves), or a VLMError naming them: a busy
    port, an address of another machine, a host that does not resolve."""
    if not 0 <= port <= 65535:
        raise VLMError(f"--port: expected 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:  # socket.gaierror: the host does not resolve
        raise VLMError(f"cannot listen on {host}:{port} (--host, --port): {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
        sock.bind(address)
        sock.listen()
    except OSError as e:
        sock.close()
        raise VLMError(f"cannot listen on {host}:{port} (--host, --port): {e.strerror or e}") from None
    return sock


def data_shapes(*, out: str, num_images: int = 100, split: str = "val", image_size: int = 64, seed: int = 0,
                scenes: str = "shapes") -> None:
    """Write built-in scenes as COCO captions and instances, VQA v2, Karpathy, JSONL and WebDataset shards.

    Args:
        out: Output directory.
        num_images: Scenes to write.
        split: Scene split: train or val.
        image_size: Image side in pixels.
        seed: Scene generator seed.
        scenes: Scene family: shapes, relational or mixed (data.scenes).
    """
    from vlm.data.export import write_shapes

    if num_images < 1:
        raise VLMError(f"--num_images {num_images}: at least 1")
    files = write_shapes(out, num_images, split=split, seed=seed, image_size=image_size, scenes=scenes)
    for layout, path in files.items():
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


def import_model(*, from_: str, out: str) -> None:
    """Import a pretrained captioner from the Hugging Face Hub into an exported vlm model directory.

    Args:
        from_: hf:NAME (a Hub model, downloaded, e.g. hf:Salesforce/blip-image-captioning-base) or hf:DIR (a local
            copy): BlipForConditionalGeneration, or VisionEncoderDecoderModel with a ViT encoder and a GPT-2 or
            BERT decoder.
        out: Output directory (model.safetensors, config.json, tokenizer.json).
    """
    from vlm import hub

    if not from_.startswith(hub.PREFIX):
        raise VLMError(f"--from: expected {hub.PREFIX}NAME_OR_DIR, got {from_!r}")
    print(f"exported model: {hub.import_model(from_, out)}")


class Group(NamedTuple):
    """A command with subcommands of its own."""

    help: str
    commands: dict[str, Callable[..., None]]


def export(*, model: str, out: str, format: str = "onnx", maps: bool = False, quantize: str | None = None) -> None:
    """Export a model for deployment: ONNX encoder and decoder step with its key/value cache, for --runtime onnx.

    Args:
        out: Output directory (encoder.onnx, decoder.onnx, onnx.json, config.json, tokenizer.json).
        format: onnx (the only format).
        maps: Also output each step's attention weights, for raw and rollout maps (vlm attend --runtime onnx).
        quantize: int8: ONNX Runtime's dynamic int8 quantization of the linear layers.
    """
    from vlm.api import load
    from vlm.deploy.export import export_onnx

    if format != "onnx":
        raise VLMError(f"--format: expected onnx, got {format!r}")
    captioner = load(model, device="cpu")  # as every command loads it: a directory, a .ckpt or hf:NAME_OR_DIR
    written = export_onnx(captioner.model, captioner.tokenizer, out, maps=maps, quantize=quantize)
    print(f"exported {model} to {written} (ONNX, {'int8' if quantize else 'fp32'}, "
          f"{'with' if maps else 'without'} maps)")


COMMANDS: dict[str, Callable[..., None] | Group] = {
    "train": train,
    "caption": caption,
    "ask": ask,
    "attend": attend,
    "eval": evaluate,
    "ground": ground,
    "predict": predict,
    "export": export,
    "import": import_model,
    "demo": demo,
    "serve": serve,
    "data": Group("Write the built-in scenes as datasets, or check a dataset.",
                  {"shapes": data_shapes, "validate": data_validate}),
}
"""Every `vlm` command, once: its name and the function that runs it."""


# ------------------------------------------------------------------------------ parsers from the signatures

OPTION_GROUPS = (DecodingConfig, MapConfig)
"""Dataclasses whose fields become a command's options when one of its parameters has their type."""

SHARED_HELP = {
    "model": "Exported model directory, Lightning .ckpt, or hf:NAME_OR_DIR (a Hugging Face captioner).",
    "runtime": "torch, or onnx: MODEL is an ONNX export (vlm export --format onnx) run on ONNX Runtime, on the CPU.",
}
"""The help of options that many commands share, said once; a command's docstring may say its own instead."""


def _summary(command: Callable[..., None] | Group) -> str:
    return command.help if isinstance(command, Group) else command.__doc__.splitlines()[0]


def usage() -> str:
    """The `vlm --help` text, from the table."""
    lines = ["usage: vlm {" + ",".join(COMMANDS) + "} ... [--debug]", ""]
    lines += [f"  {name:8s} {_summary(command)}" for name, command in COMMANDS.items()]
    lines += ["", "vlm COMMAND --help lists its options; --debug shows a traceback instead of a one-line error."]
    return "\n".join(lines) + "\n"


def _option_names(name: str) -> list[str]:
    """The option's spellings: ``--name``, with ``-`` for ``_``, then its `ALIASES`, each also either way."""
    spelt = name.rstrip("_")  # a parameter named for a Python keyword (from_) is the option --from
    names = []
    for option in (f"--{spelt}", *ALIASES.get(name, [])):
        body = option[2:]
        names += [f"--{body.replace('-', '_')}", f"--{body.replace('_', '-')}"]
    return list(dict.fromkeys(names))  # once each, in order


def _add_option(parser: ArgumentParser | argparse._ArgumentGroup, name: str, hint: typing.Any, default: typing.Any,
                doc: str | None, repeatable: bool = False) -> None:
    """``--name`` (a switch when it is a bool that is off by default, as ``--json``; else it takes a value)."""
    listed = next((h for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is list), None) if repeatable \
        else None
    if hint is bool and default is False:
        parser.add_argument(*_option_names(name), action="store_true", help=doc)
    elif listed is not None and default is None:  # a repeatable option: --question A --question B
        parser.add_argument(*_option_names(name), action="append", type=typing.get_args(listed)[0], default=None,
                            help=f"{doc} (repeatable)" if doc else None)
    else:
        required = default is inspect.Parameter.empty
        parser.add_argument(*_option_names(name), type=hint, default=None if required else default,
                            required=required, help=doc, dest=name)


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
    helps = {**SHARED_HELP, **{p.arg_name: p.description for p in doc.params}}
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
            _add_option(parser, param.name, hint, param.default, helps.get(param.name), repeatable=True)
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
