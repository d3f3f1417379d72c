"""TensorBoard event files, written through torch's SummaryWriter."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from loraens.tracking.base import MissingExtraError, ParamValue


class TensorBoardBackend:
    """Scalars per epoch, the config in the HParams tab, the card as text, figures as images.

    ``first_step`` is the first epoch this process logs: TensorBoard discards events of that
    step and later that an interrupted process wrote (even ones it had no time to record in
    tracking.json), so no epoch shows twice.
    """

    def __init__(self, log_dir: Path, first_step: int = 1):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise MissingExtraError("tensorboard", "tensorboard") from err
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(str(self.log_dir), purge_step=first_step)

    @property
    def resume_id(self) -> str | None:
        return None  # the folder is the run

    def log_params(self, params: Mapping[str, ParamValue], metric_keys: Iterable[str]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # The session lives in the same event file as the scalars, so the HParams tab reads the
        # headline metrics from their own curves (add_hparams would start a separate run).
        file_writer = self._writer.file_writer
        assert file_writer is not None  # SummaryWriter's constructor opens it
        for summary in hparams(dict(params), {key: 0.0 for key in metric_keys}):
            file_writer.add_summary(summary)
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self._writer.add_text("config", f"| key | value |\n|---|---|\n{table}", 0)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def log_text(self, name: str, text: str, step: int) -> None:
        self._writer.add_text(name, text, step)

    def log_artifact(self, path: Path) -> None:
        # TensorBoard keeps no files: images are shown, other files stay in the run directory.
        if path.suffix == ".png":
            from matplotlib.image import imread

            self._writer.add_image(path.stem, imread(path)[..., :3], 0, dataformats="HWC")

    def close(self, finished: bool) -> None:
        self._writer.close()
