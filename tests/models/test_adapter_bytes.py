"""A member's adapter folder is the same bytes whichever Python process writes it (PEFT keeps
target_modules as a set, written in hash order unless sorted)."""

import subprocess
import sys
from pathlib import Path

WRITE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from helpers import tiny_llama, tiny_tokenizer
from loraens.models.lora import LoRAEnsemble
from loraens.models.peft_io import save_member

targets = ("q_proj", "v_proj", "k_proj", "o_proj", "up_proj")
ensemble = LoRAEnsemble(tiny_llama(len(tiny_tokenizer())), 1, target_modules=targets)
ensemble.init_members([0])
save_member(ensemble, 0, Path(sys.argv[1]), "tiny")
"""


def test_adapter_folders_are_byte_identical_across_hash_seeds(tmp_path):
    tests = str(Path(__file__).resolve().parents[1])
    written = []
    for seed in ("1", "2", "3"):
        folder = tmp_path / f"seed-{seed}"
        env = {"PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1", "PATH": ""}
        subprocess.run([sys.executable, "-c", WRITE, str(folder), tests], env=env, check=True)
        written.append({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    assert written[0] == written[1] == written[2]
