"""The `vlm` command: train, caption, ask, attend, eval, demo.

Every problem with the user's input ends in one line on stderr naming the file, field or value, and a
non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from vlm.errors import VLMError


def _train_parser() -> ArgumentParser:
    from vlm.config import TrainConfig

    parser = ArgumentParser(prog="vlm train", description="Train a captioner (default: on the built-in scenes).",
                            exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file (its keys as below).")
    parser.add_class_arguments(TrainConfig, None, as_group=False)
    parser.add_argument("--out", default="runs/default", help="Output directory.")
    parser.add_argument("--resume", default=None,
                        help="Continue a run from a checkpoint: a .ckpt path, or last (OUT/checkpoints/last.ckpt).")
    parser.add_argument("--init", default=None,
                        help="Start from these weights (exported model or .ckpt), with their model config and "
                             "tokenizer; SCST (scst.enabled) needs it.")
    return parser


def _model_arg(p: ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Exported model directory or Lightning .ckpt.")


def _decoding_args(p: ArgumentParser) -> None:
    p.add_argument("--beam", type=int, default=1, help="Beam size (1: greedy).")
    p.add_argument("--length-penalty", type=float, default=0.0,
                   help="Beam search ranks hypotheses by score / length ** this.")
    p.add_argument("--no-repeat-ngram", type=int, default=0, help="Never repeat an n-gram of this size (0: off).")
    p.add_argument("--sample", action="store_true", help="Sample each token instead of taking the most likely.")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    p.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely tokens (0: all).")
    p.add_argument("--top-p", type=float, default=1.0, help="Sample within the smallest set of this much mass.")
    p.add_argument("--seed", type=int | None, default=None, help="Seed of the sampling (image i uses seed + i).")


def _decoding(args: Namespace) -> dict:
    """The decoding keyword arguments of Captioner.caption/ask/attend."""
    return dict(beam_size=args.beam, length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram,
                sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _method_args(p: ArgumentParser) -> None:
    from vlm.grounding.methods import METHODS

    p.add_argument("--method", default="raw",
                   help=f"How a token's map is made: {', '.join(METHODS)} (see vlm.grounding.methods).")
    p.add_argument("--head", type=int | None, default=None,
                   help="One cross-attention head instead of the mean (raw and rollout).")


def _subparsers() -> dict[str, ArgumentParser]:
    caption = ArgumentParser(prog="vlm caption", description="Caption images.", exit_on_error=False)
    _model_arg(caption)
    caption.add_argument("images", nargs="+", help="Image files.")
    _decoding_args(caption)
    caption.add_argument("--json", action="store_true", help="One JSON object per line.")

    ask = ArgumentParser(prog="vlm ask", description="Answer a question about an image.", exit_on_error=False)
    _model_arg(ask)
    ask.add_argument("image", help="Image file.")
    ask.add_argument("question", help="The question.")
    _decoding_args(ask)
    ask.add_argument("--json", action="store_true", help="Print a JSON object.")

    attend = ArgumentParser(prog="vlm attend", exit_on_error=False,
                            description="Write per-token attention overlays for a caption or an answer.")
    _model_arg(attend)
    attend.add_argument("image", help="Image file.")
    attend.add_argument("--question", default=None, help="Answer this question instead of captioning.")
    attend.add_argument("--out", required=True, help="Output directory.")
    _decoding_args(attend)
    attend.add_argument("--layers", type=list[int] | None, default=None,
                        help="Decoder layers whose cross-attention is averaged, e.g. [2] (default: all).")
    _method_args(attend)

    evaluate = ArgumentParser(prog="vlm eval", exit_on_error=False,
                              description="Score a model (or a results file) on a dataset, or by default on "
                                          "held-out built-in scenes; prints metrics as JSON.")
    evaluate.add_argument("--model", default=None, help="Exported model directory or Lightning .ckpt.")
    evaluate.add_argument("--results", default=None,
                          help="Score this results file (COCO captions or VQA answers) instead of a model.")
    evaluate.add_argument("--data", default=None, help="Annotation file (COCO, Karpathy, VQA questions, JSONL).")
    evaluate.add_argument("--images", default=None, help="Image folder of --data.")
    evaluate.add_argument("--format", default="auto", help="auto, coco, karpathy, vqa or jsonl.")
    evaluate.add_argument("--annotations", default=None, help="VQA v2 annotations file (answers).")
    evaluate.add_argument("--split", default=None, help="Karpathy split: train, val or test.")
    evaluate.add_argument("--limit", type=int | None, default=None, help="Score only the first N images.")
    evaluate.add_argument("--num-scenes", type=int, default=500, help="Held-out scenes to score (no --data).")
    evaluate.add_argument("--beam", type=int, default=1, help="Beam size (1: greedy).")
    evaluate.add_argument("--layers", type=list[int] | None, default=None,
                          help="Decoder layers whose attention makes the grounding maps (default: all).")
    _method_args(evaluate)
    evaluate.add_argument("--java", type=bool, default=True,
                          help="Also run METEOR (and SPICE if installed) when java is found.")
    evaluate.add_argument("--out", default=None,
                          help="With --data: output directory for result files, metrics.json and per_image.csv "
                               "(default: eval_out); without: also write the metrics JSON to this file.")
    evaluate.add_argument("--report", default=None, help="Also write an HTML report with maps to this file.")

    ground = ArgumentParser(prog="vlm ground", exit_on_error=False,
                            description="Find a phrase in an image: its map, a box, an overlay PNG and JSON.")
    _model_arg(ground)
    ground.add_argument("image", help="Image file.")
    ground.add_argument("phrase", help="The phrase to find, e.g. 'a red circle'.")
    ground.add_argument("--out", default=None, help="Write ground.png (the box drawn on the overlay) here.")
    ground.add_argument("--layers", type=list[int] | None, default=None,
                        help="Decoder layers whose attention makes the map (default: all).")
    _method_args(ground)
    ground.add_argument("--threshold", type=float, default=0.5,
                        help="The box encloses the peak's region above this fraction of the peak.")

    demo = ArgumentParser(prog="vlm demo", exit_on_error=False,
                          description="Show what a model learned: captions, answers and an overlay.")
    _model_arg(demo)
    demo.add_argument("--out", default="runs/demo", help="Where to write the overlays.")

    serve = ArgumentParser(prog="vlm serve", exit_on_error=False,
                           description="Serve a model: a web page and a JSON API (caption, ask, attend, ground).")
    _model_arg(serve)
    serve.add_argument("--host", default="127.0.0.1", help="Address to bind (default: this machine only).")
    serve.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="Largest accepted upload, in MiB.")
    serve.add_argument("--max-pixels", type=int | None, default=None,
                       help="Largest accepted image, in pixels (default: $VLM_MAX_PIXELS or the loader's limit).")
    data = ArgumentParser(prog="vlm data", exit_on_error=False, description="Write or check datasets.")
    data_commands = data.add_subcommands(dest="action")
    shapes = ArgumentParser(description="Write built-in scenes as COCO captions and instances, VQA v2, Karpathy, "
                            "JSONL and WebDataset shards.", exit_on_error=False)
    shapes.add_argument("--out", required=True, help="Output directory.")
    shapes.add_argument("--num-images", type=int, default=100, help="Scenes to write.")
    shapes.add_argument("--split", default="val", help="Scene split: train or val.")
    shapes.add_argument("--image-size", type=int, default=64, help="Image side in pixels.")
    shapes.add_argument("--seed", type=int, default=0, help="Scene generator seed.")
    data_commands.add_subcommand("shapes", shapes)
    validate = ArgumentParser(description="Check a dataset: counts, unreadable images, empty or over-long texts, "
                              "answers; exits non-zero on problems.", exit_on_error=False)
    validate.add_argument("path", help="Annotation file, JSONL file or WebDataset shards.")
    validate.add_argument("--images", default=None, help="Image folder (COCO, Karpathy, VQA).")
    validate.add_argument("--annotations", default=None, help="VQA v2 annotations file (answers).")
    validate.add_argument("--format", default="auto", help="auto, coco, karpathy, vqa, jsonl or webdataset.")
    validate.add_argument("--split", default=None, help="Karpathy split: train, val or test.")
    validate.add_argument("--max-words", type=int, default=60, help="Longer texts are reported.")
    validate.add_argument("--json", action="store_true", help="Print the report as JSON.")
    data_commands.add_subcommand("validate", validate)
    return {"caption": caption, "ask": ask, "attend": attend, "eval": evaluate, "ground": ground, "demo": demo,
            "serve": serve, "data": data}


COMMANDS = ("train", "caption", "ask", "attend", "eval", "ground", "demo", "serve", "data")


def _usage() -> str:
    return (
        "usage: vlm {" + ",".join(COMMANDS) + "} ... [--debug]\n\n"
        "  train    train a captioner (vlm train --help, --print_config)\n"
        "  caption  caption images\n"
        "  ask      answer a question about an image\n"
        "  attend   write per-token attention overlays\n"
        "  eval     score a model or a results file on a dataset (default: held-out built-in scenes)\n"
        "  ground   find a phrase in an image: its attention map and a box\n"
        "  demo     show captions, answers and an overlay of a trained model\n"
        "  serve    serve a model: a web page and a JSON API\n"
        "  data     write the built-in scenes as datasets (data shapes), check a dataset (data validate)\n"
    )


def run_train(args: Namespace, parser: ArgumentParser) -> None:
    from vlm.config import TrainConfig
    from vlm.train.run import train

    cfg = parser.instantiate(args)
    sections = ("model", "data", "optim", "trainer", "val", "scst")
    model_dir = train(TrainConfig(**{k: cfg[k] for k in sections}), args.out, resume=args.resume, init=args.init)
    if model_dir is not None:  # rank 0
        print(f"exported model: {model_dir}")


def run_caption(args: Namespace) -> None:
    from vlm import load

    model = load(args.model)
    captions = model.caption(args.images, **_decoding(args))
    for image, caption in zip(args.images, captions, strict=True):
        print(json.dumps({"image": image, "caption": caption}) if args.json else caption)


def run_ask(args: Namespace) -> None:
    from vlm import load

    answer = load(args.model).ask([args.image], [args.question], **_decoding(args))[0]
    print(json.dumps({"image": args.image, "question": args.question, "answer": answer}) if args.json else answer)


def run_attend(args: Namespace) -> None:
    from vlm import load

    result = load(args.model).attend(args.image, question=args.question, layers=args.layers, method=args.method,
                                     head=args.head, **_decoding(args))
    written = result.save(args.out)
    print(result.text)
    print(f"wrote {len(written['files'])} token overlays, grid.png and attention.json to {args.out}")


def run_eval(args: Namespace) -> None:
    from vlm import load

    if args.data is None:
        from vlm.eval.builtin import evaluate_builtin

        if args.model is None:
            raise VLMError("--model: needed to score the built-in scenes (or give --results with --data)")
        if args.num_scenes < 1:
            raise VLMError(f"--num-scenes: expected a positive number of scenes, got {args.num_scenes}")
        metrics = evaluate_builtin(load(args.model), num_scenes=args.num_scenes, beam_size=args.beam,
                                   layers=args.layers, method=args.method, head=args.head)
        text = json.dumps(metrics, indent=2)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
        print(text)
        return
    from vlm.eval.run import evaluate_data

    metrics, written = evaluate_data(args)
    print(json.dumps(metrics, indent=2))
    for note in (f"{name} {why}" for name, why in metrics.get("caption", {}).get("skipped", {}).items()):
        print(f"note: {note}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)


def run_ground(args: Namespace) -> None:
    from vlm import load
    from vlm.grounding.ground import ground

    result = ground(load(args.model), args.image, args.phrase, method=args.method, layers=args.layers,
                    head=args.head, threshold=args.threshold, out_dir=args.out)
    print(json.dumps(result, indent=2))


def run_demo(args: Namespace) -> None:
    from vlm import load
    from vlm.data.scenes import make_scene

    model = load(args.model)
    scenes = [make_scene(i, "val", image_size=model.model.cfg.encoder.image_size) for i in range(4)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (scene, caption) in enumerate(zip(scenes, model.caption([s.image for s in scenes]), strict=True)):
        path = out / f"scene{i}.png"
        scene.image.save(path)
        print(f"{path}: {caption}")
        questions = scene.questions[:3]
        for q, a in zip(questions, model.ask([scene.image] * len(questions), [q.question for q in questions]),
                        strict=True):
            print(f"    Q: {q.question}  A: {a}  (truth: {q.answer})")
    result = model.attend(scenes[0].image)
    result.save(out / "attention")
    print(f"attention overlays of '{result.text}': {out / 'attention' / 'grid.png'}")


def run_serve(args: Namespace) -> None:
    import uvicorn

    from vlm import load
    from vlm.serve import create_app

    app = create_app(load(args.model), max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels)
    print(f"serving {args.model} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def run_data(args: Namespace) -> None:
    if args.action == "shapes":
        from vlm.data.export import write_shapes

        a = args.shapes
        files = write_shapes(a.out, a.num_images, split=a.split, seed=a.seed, image_size=a.image_size)
        for layout, path in files.items():
            print(f"{layout:12s} {path}")
        return
    from vlm.config import SourceConfig
    from vlm.data.validate import validate

    a = args.validate
    report = validate(SourceConfig(a.path, a.format, a.images, a.annotations, a.split), max_words=a.max_words)
    if a.json:
        print(json.dumps(report, indent=2))
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vlm: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        if command == "train":
            parser = _train_parser()
            run_train(parser.parse_args(rest), parser)
        else:
            args = _subparsers()[command].parse_args(rest)
            globals()[f"run_{command}"](args)
    except VLMError as e:
        if debug:
            raise
        print(f"vlm {command}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # argument errors from jsonargparse, and anything unexpected
        if debug:
            raise
        message = " ".join(str(e).split()) or e.__class__.__name__
        print(f"vlm {command}: error: {message}", file=sys.stderr)
        return 2 if e.__class__.__name__ == "ArgumentError" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
