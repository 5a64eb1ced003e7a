"""Where the Hydra config tree lives: conf/ beside the package in a source checkout,
or DISTFT_CONF_DIR when set."""
import os
from pathlib import Path

CONF_DIR = os.environ.get("DISTFT_CONF_DIR") or str(Path(__file__).resolve().parent.parent / "conf")
