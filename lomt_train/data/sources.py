"""Where the real data sets are published, and where ``lomt_train`` looks for them.

Without ``--data``, a training command reads ``$LOMT_DATA/<dataset>`` (``$LOMT_DATA/nyu``,
``$LOMT_DATA/celeba``); :func:`default_data_root` finds that folder or says where to get the
data and which layout the folder must have.
"""

from __future__ import annotations

import os
from pathlib import Path

from .celeba import CELEBA_TREE
from .nyu import MTAN_TREE, NYUD_MT_TREE

#: The environment variable naming the folder that holds one subfolder per data set.
DATA_ENV = "LOMT_DATA"

#: Per data set: where it is published, and the layout its folder must have.
SOURCES: dict[str, str] = {
    "nyu": (
        "NYU-v2 is published in two preprocessed layouts; either works (--layout names it):\n"
        "* NYUD_MT, 40 classes with edges (the papers' data): "
        "https://data.vision.ee.ethz.ch/kmaninis/share/MTL/NYUD_MT.tgz (from ASTMT, "
        "github.com/facebookresearch/astmt; also linked by github.com/SimonVandenhende/Multi-Task-Learning-PyTorch)\n"
        f"{NYUD_MT_TREE}\n"
        "* the MTAN layout, 13 classes: the preprocessed NYUv2 linked from github.com/lorenmt/mtan "
        "(also used by LibMTL)\n"
        f"{MTAN_TREE}"
    ),
    "celeba": (
        "CelebAMask-HQ is published at github.com/switchablenorms/CelebAMask-HQ (download links in its README); "
        "unpack it as released:\n"
        f"{CELEBA_TREE}"
    ),
}


def default_data_root(dataset: str) -> Path:
    """``$LOMT_DATA/<dataset>``, the folder read when no ``--data`` is given.

    Raises:
        ValueError: ``LOMT_DATA`` is unset or has no ``<dataset>`` folder; the message says
            where the data is published, the layout it needs, and that ``--synthetic`` runs now.
    """
    base = os.environ.get(DATA_ENV)
    if base and (Path(base) / dataset).is_dir():
        return Path(base) / dataset
    looked = f"${DATA_ENV}/{dataset} ({Path(base) / dataset}) is not a folder" if base else f"${DATA_ENV} is not set"
    raise ValueError(
        f"no {dataset} data: {looked}. Give a dataset folder with --data PATH, or use --synthetic to run "
        f"now on the built-in synthetic data (same layout), or put the data in ${DATA_ENV}/{dataset}.\n"
        f"{SOURCES[dataset]}"
    )
