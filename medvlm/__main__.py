"""The command line of DESIGN section 4: `python -m medvlm SUBCOMMAND ...`.

A user's mistake (a missing file, an unreadable scan, a bad option) ends with exit status 2 and
one line on stderr; tracebacks are kept for our own bugs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from .errors import UserInputError
from .limits import MAX_NEW_TOKENS

USER_ERROR = 2
BROKEN_PIPE = 141  # the shell's status for a program killed by SIGPIPE (128 + 13)


class UsageError(Exception):
    """A command-line mistake, reported as one line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _scan_source(paths: list[str]) -> str | list[str]:
    """One path stays a path (file, folder or zip); several are the files of one DICOM series."""
    return paths[0] if len(paths) == 1 else paths


def _load(paths: list[str], modality: str | None):
    """The scan at `paths` (`_scan_source`), read as `modality` where one is given (--modality)."""
    from .volume import load_volume

    volume = load_volume(_scan_source(paths))
    return volume if modality is None else volume.as_modality(modality)


def _stream(chunks: Iterable[str]) -> None:
    """The answer on stdout as it comes; on stderr, a note where it was cut off at --max-new-tokens. However it ends
    (the reader of a pipe gone, `| head`), the generation ends with it: left running in torch, its thread would abort
    the interpreter's exit."""
    from .pipeline import CutOff

    try:
        for chunk in chunks:
            sys.stdout.write(chunk)
            sys.stdout.flush()
            if isinstance(chunk, CutOff) and chunk.context:
                print(f"\n(cut off at the end of the model's context, {chunk.context} tokens with the scan and the "
                      "prompt; no longer answer fits)", file=sys.stderr)
            elif isinstance(chunk, CutOff):
                print(f"\n(cut off at the limit of {chunk.limit} new tokens; raise --max-new-tokens for the whole "
                      "answer)", file=sys.stderr)
        sys.stdout.write("\n")
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


# What `info` says of a file that stores no geometry (an M3D .npy), beside what was left out or drawn approximately.
ASSUMED_GEOMETRY = ("the file stores no spacing or orientation (an M3D .npy): the spacing of 1 mm and the "
                    "orientation, M3D's layout, are assumed")


def cmd_info(args: argparse.Namespace) -> None:
    volume = _load(args.scan, args.modality)
    print(json.dumps({
        "modality": volume.modality,
        "shape": list(volume.shape),
        "spacing": [round(float(s), 4) for s in volume.spacing],
        "orientation": volume.orientation,
        "source": volume.source,
        "units": volume.units,  # HU for a CT, a PET's Bq/mL or SUV where the file says; None: not stated or doubtful
        "notes": [*volume.meta.get("notes", []), *([] if volume.spacing_known else [ASSUMED_GEOMETRY])],
    }))


def cmd_view(args: argparse.Namespace) -> None:
    from .view import png_path, render_slice, save_png

    png_path(args.out)
    volume = _load(args.scan, args.modality)
    image = render_slice(volume, args.plane, args.index, args.window)
    save_png(image, args.out)
    print(args.out)


def _generation_settings(args: argparse.Namespace) -> dict:
    """--max-new-tokens, --temperature and --top-p, checked before any scan or model is loaded."""
    from .pipeline import check_generation

    check_generation(args.max_new_tokens, args.temperature, args.top_p)
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}


def cmd_report(args: argparse.Namespace) -> None:
    from .pipeline import Pipeline

    settings = _generation_settings(args)
    volume = _load(args.scan, args.modality)
    pipeline = Pipeline.from_pretrained(args.checkpoint, revision=args.revision, device=args.device)
    _stream(pipeline.report(volume, **settings))


def cmd_ask(args: argparse.Namespace) -> None:
    from .pipeline import Pipeline

    *scan, question = args.scan_and_question
    if not scan:
        raise UsageError("ask: give one or more scan paths followed by the question")
    settings = _generation_settings(args)
    volume = _load(scan, args.modality)
    pipeline = Pipeline.from_pretrained(args.checkpoint, revision=args.revision, device=args.device)
    messages = [{"role": "user", "content": question}]
    _stream(pipeline.chat(volume, messages, **settings))


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _lesion_size(text: str) -> tuple[float, float]:
    """"2,8" → (2.0, 8.0): a (min, max) lesion diameter range in mm."""
    try:
        low, high = (float(size) for size in _csv(text))
    except ValueError:
        low = high = 0.0
    if not 0 < low <= high:
        raise UsageError("phantom: --lesion-size takes MIN,MAX diameters in mm with 0 < MIN <= MAX (e.g. 2,8)")
    return low, high


def _npy_shape(text: str) -> tuple[int, int, int]:
    """"32,256,256" → (32, 256, 256): the Z,Y,X size of the M3D arrays."""
    try:
        npy_shape = tuple(int(side) for side in _csv(text))
    except ValueError:
        npy_shape = ()
    if len(npy_shape) != 3 or min(npy_shape) < 1:
        raise UsageError("phantom: --npy-shape takes three whole numbers of voxels, Z,Y,X (e.g. 32,256,256)")
    return npy_shape


def _check_seed(command: str, seed: int) -> None:
    """A seed numpy and torch take (0 … 2**32 - 1), checked before anything is written."""
    if not 0 <= seed < 2**32:
        raise UsageError(f"{command}: --seed must be a whole number from 0 to {2**32 - 1}, not {seed}")


def cmd_phantom(args: argparse.Namespace) -> None:
    from .phantom import write_phantom_set

    _check_seed("phantom", args.seed)
    npy_shape = _npy_shape(args.npy_shape)
    lesion_size = _lesion_size(args.lesion_size) if args.lesion_size else None
    summary = write_phantom_set(args.out, n=args.n, seed=args.seed, modalities=tuple(_csv(args.modality)),
                                formats=tuple(_csv(args.format)), split=args.split, matrix=args.matrix,
                                npy_shape=npy_shape, lesion_size_mm=lesion_size)
    print(json.dumps(summary))
    if summary["too_coarse"]:
        print(f"note: {summary['too_coarse']} of {summary['n']} phantoms have pixels too coarse for lesions of "
              f"{args.lesion_size} mm (a lesion needs 1.5 pixels across) and hold none; use a larger --matrix, "
              "e.g. 160", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> None:
    from .configuration import MedVLMConfig
    from .encoder_pretraining import hard_negative_share, slice_heads
    from .train import load_preset, train
    from .variants import apply_overrides, variant_overrides

    try:
        overrides = variant_overrides(args.variant, args.set)
        preset = apply_overrides(load_preset(args.preset), overrides)
        MedVLMConfig(**preset["model"])  # a bad value stops here, before any work
        if preset.get("encoder_pretraining"):
            slice_heads(preset["encoder_pretraining"])
            hard_negative_share(preset["encoder_pretraining"])
    except ValueError as error:
        raise UsageError(f"train: {error}") from None
    if args.features and args.from_volumes:
        raise UsageError("train: give --features or --from-volumes, not both")
    _check_seed("train", args.seed)
    _print_once(train(args.preset, args.data, args.out, seed=args.seed, work=args.work, config_overrides=overrides,
                      features=args.features, from_volumes=args.from_volumes))


def _print_once(result: object) -> None:
    """Print what a command made once, from the main process of those `accelerate launch` started (each returns it)."""
    from .features import process_state

    process_state().print(result)


def _output_folder(command: str, path: str | None) -> None:
    """Refuse, before any work, an --out that is a file: the command writes a folder there, at its end."""
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{command}: {path} is a file, not a folder; give --out a folder to write")


def cmd_features(args: argparse.Namespace) -> None:
    from .features import encode_data_folder

    if args.shard_size < 1:
        raise UsageError("features: --shard-size is the number of scans per file, at least 1")
    _output_folder("features", args.out)
    _print_once(encode_data_folder(args.checkpoint_or_preset, args.data, args.out, splits=tuple(_csv(args.split)),
                                   revision=args.revision, shard_size=args.shard_size))


def cmd_push(args: argparse.Namespace) -> None:
    from .hub import push_checkpoint

    evaluation = None
    if args.evaluation:
        try:
            with open(args.evaluation) as handle:
                evaluation = json.load(handle)
        except (OSError, ValueError) as error:
            raise UsageError(f"push: cannot read --evaluation {args.evaluation}: {error}") from None
    print(push_checkpoint(args.checkpoint, args.repo_id, revision=args.revision, private=args.private,
                          evaluation=evaluation))


def cmd_ablate(args: argparse.Namespace) -> None:
    from .ablation import run_study

    if args.seeds < 1:
        raise UsageError("ablate: --seeds must be at least 1 (2 or more for error bars)")
    _output_folder("ablate", args.out)
    run_study(args.out, size=args.size, seeds=args.seeds, work=args.work)


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate
    from .pipeline import check_generation

    check_generation(args.max_new_tokens, 0.0, 1.0)  # before any model or data is read
    if args.limit is not None and args.limit < 1:
        raise UsageError("eval: --limit must be at least 1 (leave it out to score every scan)")
    results = evaluate(args.checkpoint, args.data, split=args.split, limit=args.limit, device=args.device,
                       max_new_tokens=args.max_new_tokens, revision=args.revision)
    if results is not None:  # under accelerate, only the main process scores and prints
        print(json.dumps(results, indent=2 if args.pretty else None))


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run_benchmark, summary_table

    if args.repeats < 1:
        raise UsageError("bench: --repeats must be at least 1")
    figures = run_benchmark(device=args.device, repeats=args.repeats, checkpoint=args.checkpoint)
    print(json.dumps(figures) if args.json else summary_table(figures))


def _device(text: str) -> str:
    """--device, checked against this machine when it is parsed (argparse reports the sentence)."""
    from .pipeline import resolve_device

    try:
        return resolve_device(text)
    except UserInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


COMMITTED_STUDY = Path(__file__).resolve().parent.parent / "assets" / "results"  # `ablate`'s results, as committed
SCAN_HELP = "NIfTI (.nii, .nii.gz), M3D .npy, a DICOM folder or .zip, or several DICOM files of one series"


def _preset_names() -> list[str]:
    """The presets shipped in medvlm/presets (`train.PRESETS`), without importing the trainer."""
    return sorted(path.stem for path in (Path(__file__).resolve().parent / "presets").glob("*.json"))


def _add_modality_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", choices=["CT", "MR", "PT", "OT"], default=None,
                        help="read the scan as this modality (PT: PET), for a NIfTI that does not say which it is")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint folder or Hugging Face Hub repo id (default: the demo checkpoint)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit of --checkpoint")
    parser.add_argument("--device", type=_device, default=None,
                        help="cpu, cuda or cuda:N (default: cuda when there is one)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help=f"most tokens to write, 1 to {MAX_NEW_TOKENS} (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (the default) for greedy decoding, or 0.01 to 100 to sample")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="with --temperature above 0: sample from the likeliest tokens that hold this share of "
                             "the probability, above 0 and at most 1 (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m medvlm", description="MedVLM 3D: read, view and describe 3D scans.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = commands.add_parser("info", help="load a scan and print its facts as JSON")
    info.add_argument("scan", nargs="+", help=SCAN_HELP)
    _add_modality_option(info)
    info.set_defaults(run=cmd_info)

    view = commands.add_parser("view", help="write one slice as the viewer shows it, as PNG")
    view.add_argument("scan", nargs="+", help=SCAN_HELP)
    view.add_argument("--plane", choices=["axial", "coronal", "sagittal", "mip"], default="axial",
                      help="mip: the rotating maximum intensity projection, its frames 10° apart")
    view.add_argument("--index", type=int, default=None,
                      help="slice index from 0 (default: the middle slice); with --plane mip, the frame (0: seen "
                           "from the front, 9: from the patient's left)")
    view.add_argument("--window", default=None,
                      help="CT: soft tissue, lung, bone, brain, liver; PET: inverted, and in SUV 'SUV 0-5', "
                           "'SUV 0-5 inverted', 'SUV 0-10 inverted'; auto; or width/level (350/50) or a range (0-6), "
                           "either followed by 'inverted' for the highest value black. Default: "
                           "soft tissue for CT, inverted for a PET's MIP, else auto")
    view.add_argument("--out", required=True, help="PNG file to write")
    _add_modality_option(view)
    view.set_defaults(run=cmd_view)

    report = commands.add_parser("report", help="stream a radiology-style report of a scan")
    report.add_argument("scan", nargs="+", help=SCAN_HELP)
    _add_modality_option(report)
    _add_model_options(report)
    report.set_defaults(run=cmd_report)

    ask = commands.add_parser("ask", help="stream the answer to one question about a scan",
                              usage="python -m medvlm ask [options] SCAN [SCAN ...] QUESTION")
    ask.add_argument("scan_and_question", nargs="+", metavar="SCAN... QUESTION",
                     help=f"{SCAN_HELP}; then the question, in quotes")
    _add_modality_option(ask)
    _add_model_options(ask)
    ask.set_defaults(run=cmd_ask)

    phantom = commands.add_parser("phantom", help="write synthetic phantoms with reports, VQA and ground truth")
    phantom.add_argument("out", help="folder to write (M3D layout)")
    phantom.add_argument("--n", type=int, required=True, help="number of volumes")
    phantom.add_argument("--seed", type=int, default=0, help="the same seed writes the same phantoms (default: 0)")
    phantom.add_argument("--modality", default="ct,mr,pt", help="comma-separated: ct, mr, pt")
    phantom.add_argument("--format", default="npy", help="comma-separated: npy, nifti, dicom (first is used "
                                                         "in the JSON and CSVs; default: npy)")
    phantom.add_argument("--split", default=None, help="put every volume in this split (train, validation, test)")
    phantom.add_argument("--matrix", type=int, default=None,
                         help="in-plane size (e.g. 160) for small, fast volumes; default: realistic 256-512")
    phantom.add_argument("--npy-shape", default="32,256,256", help="Z,Y,X of the M3D .npy arrays")
    phantom.add_argument("--lesion-size", default=None, metavar="MIN,MAX",
                         help="every lesion's diameter in mm within MIN,MAX (e.g. 2,8: the small-lesion split)")
    phantom.set_defaults(run=cmd_phantom)

    train = commands.add_parser("train", help="train a checkpoint with accelerate from a preset")
    train.add_argument("--preset", default="demo",
                       help=f"one of {', '.join(_preset_names())} (tiny: a smoke test of seconds), or a JSON file "
                            "in their form (default: demo)")
    train.add_argument("--data", required=True, help="M3D-format data folder (phantoms or M3D-Cap / M3D-VQA)")
    train.add_argument("--out", required=True, help="checkpoint folder to write")
    train.add_argument("--work", default=None, help="feature cache, resumable state, metrics (default: OUT-training)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order "
                                                            "(default: 0); a run resumes only with its own")
    train.add_argument("--variant", default=None, help="an ablation variant (see medvlm/variants.py), e.g. "
                                                       "uniform_selection, average_compressor, vit3d")
    train.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="override a model setting of the preset (repeatable), e.g. fusion_mode=spatial")
    train.add_argument("--features", default=None, help="a feature cache from `python -m medvlm features` "
                                                        "(default: built in the work folder)")
    train.add_argument("--from-volumes", action="store_true",
                       help="no feature cache: run the frozen encoder on the volumes at every step")
    train.set_defaults(run=cmd_train)

    features = commands.add_parser("features", help="encode every scan once with the frozen encoder (a cache "
                                                    "for train --features)")
    features.add_argument("--checkpoint-or-preset", required=True,
                          help="a checkpoint folder or Hub repo id, or a preset whose encoder is pretrained")
    features.add_argument("--data", required=True, help="M3D-format data folder")
    features.add_argument("--out", required=True, help="folder for the safetensors shards and features.json")
    features.add_argument("--split", default="train,validation", help="comma-separated splits to encode")
    features.add_argument("--revision", default=None, help="Hub branch, tag or commit of a checkpoint repo id")
    features.add_argument("--shard-size", type=int, default=512, help="scans per safetensors shard")
    features.set_defaults(run=cmd_features)

    push = commands.add_parser("push", help="upload a checkpoint with its model card to the Hugging Face Hub")
    push.add_argument("checkpoint", help="the checkpoint folder `train --out` wrote")
    push.add_argument("repo_id", help="Hub model repo, org/name (created if needed)")
    push.add_argument("--revision", default=None, help="branch to upload to (created if needed; default main)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--evaluation", default=None, help="eval JSON to put in the model card")
    push.set_defaults(run=cmd_push)

    ablate = commands.add_parser("ablate", help="the ablation and data-efficiency study on phantoms (hours)")
    ablate.add_argument("--out", default=str(COMMITTED_STUDY),
                        help="folder for ablations.json, data_efficiency.png, ablations.log (default: this repo's "
                             "committed study, assets/results, from any working folder)")
    ablate.add_argument("--size", choices=["small", "full", "tiny"], default="small",
                        help="small: a few hours on 2 CPU cores; full: larger sets; tiny: a smoke test")
    ablate.add_argument("--seeds", type=int, default=2, help="training seeds per comparison")
    ablate.add_argument("--work", default=None, help="phantoms, checkpoints, resumable state (default: OUT-training)")
    ablate.set_defaults(run=cmd_ablate)

    evaluation = commands.add_parser("eval", help="score a checkpoint as M3D's benchmark does; prints JSON")
    evaluation.add_argument("--checkpoint", default=None, help="folder or Hub repo id (default: the demo checkpoint)")
    evaluation.add_argument("--revision", default=None, help="Hub branch, tag or commit of --checkpoint")
    evaluation.add_argument("--data", required=True, help="M3D-format data folder")
    evaluation.add_argument("--split", default="test", help="train, validation or test (default: test)")
    evaluation.add_argument("--limit", type=int, default=None, help="score only the first N scans")
    evaluation.add_argument("--device", type=_device, default=None,
                            help="cpu, cuda or cuda:N (default: cuda when there is one)")
    evaluation.add_argument("--pretty", action="store_true", help="indent the JSON")
    evaluation.add_argument("--max-new-tokens", type=int, default=256, help="M3D's protocol: 256 (the default)")
    evaluation.set_defaults(run=cmd_eval)

    bench = commands.add_parser("bench", help="measure speed, size and memory from upload to first token")
    bench.add_argument("--json", action="store_true", help="print one JSON object (default: a short table)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="cuda adds the real-size configuration from random weights")
    bench.add_argument("--repeats", type=int, default=5, help="runs per figure; each figure is their median")
    bench.add_argument("--checkpoint", default=None,
                       help="checkpoint folder or Hub repo id (default: the demo checkpoint)")
    bench.set_defaults(run=cmd_bench)
    return parser


RESUMABLE = (cmd_train, cmd_ablate)  # commands that continue where they stopped when run again


# The errors of a path the command could not make or write: where it is a user's choice (--out, --work), one line.
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOSPC}


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader went away (poll reports an error on it), not some other pipe."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll here, or no stdout file
        return False


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except (UsageError, UserInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a program killed by SIGPIPE does
        if not _stdout_gone():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail too
        return BROKEN_PIPE
    except OSError as error:  # a folder the command could not make or write (another user's, a read-only disk)
        if error.filename is None or error.errno not in UNWRITABLE:
            raise
        print(f"error: cannot write to {error.filename} ({error.strerror}); give a path you can write to",
              file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C: no traceback; 130 is the shell's status for an interrupted program
        resume = getattr(args, "run", None) in RESUMABLE
        print("stopped" + ("; run the same command again to resume from the last finished epoch" if resume else ""),
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
