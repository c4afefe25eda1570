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
    return parser


def _model_arg(p: ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Exported model directory or Lightning .ckpt.")


def _subparsers() -> dict[str, ArgumentParser]:
    caption = ArgumentParser(prog="vlm caption", description="Caption images.", exit_on_error=False)
    _model_arg(caption)
    caption.add_argument("images", nargs="+", help="Image files.")
    caption.add_argument("--beam", type=int, default=1, help="Beam size (1: greedy).")
    caption.add_argument("--json", action="store_true", help="One JSON object per line.")

    ask = ArgumentParser(prog="vlm ask", description="Answer a question about an image.", exit_on_error=False)
    _model_arg(ask)
    ask.add_argument("image", help="Image file.")
    ask.add_argument("question", help="The question.")
    ask.add_argument("--beam", type=int, default=1, help="Beam size (1: greedy).")
    ask.add_argument("--json", action="store_true", help="Print a JSON object.")

    attend = ArgumentParser(prog="vlm attend", exit_on_error=False,
                            description="Write per-token attention overlays for a caption or an answer.")
    _model_arg(attend)
    attend.add_argument("image", help="Image file.")
    attend.add_argument("--question", default=None, help="Answer this question instead of captioning.")
    attend.add_argument("--out", required=True, help="Output directory.")
    attend.add_argument("--beam", type=int, default=1, help="Beam size (1: greedy).")
    attend.add_argument("--layers", type=list[int] | None, default=None,
                        help="Decoder layers whose cross-attention is averaged, e.g. [2] (default: all).")

    evaluate = ArgumentParser(prog="vlm eval", exit_on_error=False,
                              description="Score a model on held-out built-in scenes; prints metrics as JSON.")
    _model_arg(evaluate)
    evaluate.add_argument("--num-scenes", type=int, default=500, help="Held-out scenes to score.")
    evaluate.add_argument("--beam", type=int, default=1, help="Beam size (1: greedy).")
    evaluate.add_argument("--layers", type=list[int] | None, default=None,
                          help="Decoder layers whose cross-attention makes the grounding maps (default: all).")
    evaluate.add_argument("--out", default=None, help="Also write the metrics JSON to this file.")

    demo = ArgumentParser(prog="vlm demo", exit_on_error=False,
                          description="Show what a model learned: captions, answers and an overlay.")
    _model_arg(demo)
    demo.add_argument("--out", default="runs/demo", help="Where to write the overlays.")
    return {"caption": caption, "ask": ask, "attend": attend, "eval": evaluate, "demo": demo}


COMMANDS = ("train", "caption", "ask", "attend", "eval", "demo")


def _usage() -> str:
    return (
        "usage: vlm {" + ",".join(COMMANDS) + "} ... [--debug]\n\n"
        "  train    train a captioner (vlm train --help, --print_config)\n"
        "  caption  caption images\n"
        "  ask      answer a question about an image\n"
        "  attend   write per-token attention overlays\n"
        "  eval     score a model on held-out built-in scenes\n"
        "  demo     show captions, answers and an overlay of a trained model\n"
    )


def run_train(args: Namespace, parser: ArgumentParser) -> None:
    from vlm.config import TrainConfig
    from vlm.train.run import train

    cfg = parser.instantiate(args)
    model_dir = train(TrainConfig(**{k: cfg[k] for k in ("model", "data", "optim", "trainer")}), args.out)
    if model_dir is not None:  # rank 0
        print(f"exported model: {model_dir}")


def run_caption(args: Namespace) -> None:
    from vlm import load

    model = load(args.model)
    captions = model.caption(args.images, beam_size=args.beam)
    for image, caption in zip(args.images, captions, strict=True):
        print(json.dumps({"image": image, "caption": caption}) if args.json else caption)


def run_ask(args: Namespace) -> None:
    from vlm import load

    answer = load(args.model).ask([args.image], [args.question], beam_size=args.beam)[0]
    print(json.dumps({"image": args.image, "question": args.question, "answer": answer}) if args.json else answer)


def run_attend(args: Namespace) -> None:
    from vlm import load

    result = load(args.model).attend(args.image, question=args.question, beam_size=args.beam, layers=args.layers)
    written = result.save(args.out)
    print(result.text)
    print(f"wrote {len(written['files'])} token overlays, grid.png and attention.json to {args.out}")


def run_eval(args: Namespace) -> None:
    from vlm import load
    from vlm.eval.builtin import evaluate_builtin

    metrics = evaluate_builtin(load(args.model), num_scenes=args.num_scenes, beam_size=args.beam,
                               layers=args.layers)
    text = json.dumps(metrics, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


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
