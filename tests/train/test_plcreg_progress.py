"""PLCReg training shows a progress bar and writes its training curves (issue 17 item 6: only
AlignSegNet had either)."""

import torch

from regseg.models.plcreg import PLCReg, PLCRegConfig
from regseg.train.plcreg_recipe import StepProgress, Weights, save_run, take_step


def test_progress_bar_and_curves(tmp_path, capsys):
    cfg = PLCRegConfig(ndim=2, size=(16, 16), channels=(4, 8), heads=2, window=(4, 4))
    model = PLCReg(cfg)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    history: list[dict[str, float]] = []
    bar = StepProgress("plcreg2d", 60.0, enabled=True)
    for _ in range(20):
        out = model(torch.rand(2, cfg.moving_channels, 16, 16), torch.rand(2, 1, 16, 16))
        loss = out["ddf"].square().mean() + 1e-3
        take_step(optimiser, loss, {"smooth": loss}, history, progress=bar)
    bar.close()
    err = capsys.readouterr().err
    assert "plcreg2d:" in err and "step=20" in err  # the bar, with the step and the loss
    save_run(tmp_path, "plcreg2d", model, cfg, {"steps": 20}, Weights(), 0, 1e-3,
             history=history)
    png = tmp_path / "plcreg2d_training.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
