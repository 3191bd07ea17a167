"""Write the demo's generated dataset: python examples/make_demo_dataset.py [FOLDER]"""

import sys
from pathlib import Path

from training.data.synthetic import make_shape_dataset

folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".demo/dataset")
if not any(folder.glob("*.png")):
    make_shape_dataset(folder, 8, trigger_word="xyz_demo")
print(f"demo dataset: {folder} ({len(list(folder.glob('*.png')))} images)")
