"""`loraens export RUN DIR`: a finished run's members as one folder of named PEFT adapters.

The folder is laid out as PEFT's multi-adapter ``PeftModel.save_pretrained`` writes one: the
adapter named ``default`` (member 0) at the root, every other adapter in a subfolder named after
it (``member-01``, ...). Plain PEFT loads it with ``PeftModel.from_pretrained(base, DIR)`` plus
``load_adapter(DIR/name, adapter_name=name)`` for the rest. Beside the adapters: the card, the
run's config, summary and provenance, and ensemble.json listing the adapters in member order,
which lets every `loraens` command that takes a run take this folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loraens.io import atomic_path, write_json_atomic
from loraens.models.peft_io import BLOB_SCALES
from loraens.rundir.card import read_provenance, render_card, run_adapters
from loraens.rundir.layout import PEFT_DEFAULT_ADAPTER, RunDir

EXPORT_FORMAT = "loraens-ensemble"
EXPORT_VERSION = 1
# The files of a PEFT adapter folder loraens writes (models/peft_io.py).
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_names(n_members: int) -> list[str]:
    """Member 0 is PEFT's default adapter (at the folder's root), the others member-NN."""
    return [PEFT_DEFAULT_ADAPTER] + [f"member-{m:02d}" for m in range(1, n_members)]


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the export of the finished LoRA run ``run_dir`` to ``out_dir``; its path."""
    run, out = RunDir(Path(run_dir)), Path(out_dir)
    cfg = run.read_config()
    if not run.summary.is_file():
        raise ValueError(
            f"{run.root} is not a finished run (no {run.summary.name}); finish it with "
            f"loraens train --resume {run.root}, then export."
        )
    if cfg.ensemble.method == "last_layer":
        raise ValueError(
            f"{run.root} is a last-layer ensemble: its members are not PEFT adapters, so there "
            "is nothing PEFT could load. Export LoRA (or MC dropout) runs."
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose another DIR.")
    if out.resolve() == run.root.resolve():
        raise ValueError("Export to a folder other than the run itself.")
    folders = run.member_folders()
    names = adapter_names(len(folders))
    summary = run.read_summary()
    with atomic_path(out) as tmp:
        exported = RunDir(tmp)
        for name, folder in zip(names, folders, strict=True):
            target = exported.exported_adapter(name)
            target.mkdir(parents=True, exist_ok=True)
            for file in _ADAPTER_FILES:
                shutil.copy2(folder / file, target / file)
            if (folder / BLOB_SCALES).is_file():  # a BLoB member's scale, beside its mean
                shutil.copy2(folder / BLOB_SCALES, target / BLOB_SCALES)
        for source in (run.config, run.summary, run.provenance):
            if source.is_file():
                shutil.copy2(source, tmp / source.name)
        write_json_atomic(
            exported.export_manifest,
            {
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "adapters": names,
                "method": cfg.ensemble.method,
                "base_model": cfg.model.name_or_path,
                "exported_from": str(run.root),
            },
        )
        card = render_card(cfg, summary, read_provenance(run), run_adapters(exported), str(out))
        exported.card.write_text(card, encoding="utf-8")
    return out
