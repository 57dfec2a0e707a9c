"""Shared fixtures."""
import pytest


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A small finished run (all three phases) and its exported student: (run_dir, model.pt2)."""
    from dagfm_ext.config import RunConfig
    from dagfm_ext.distill import Pipeline
    from dagfm_ext.export import export_checkpoint
    root = tmp_path_factory.mktemp("finished")
    run_dir = root / "run"
    Pipeline(RunConfig(dataset="synthetic", synthetic_size=600, embed_dim=4, batch_size=128, max_epochs=1,
                       patience=1, depth=2, teacher_depth=2, seed=3, progress=False, device="cpu",
                       output=str(run_dir))).run()
    export_checkpoint(run_dir, root / "model.pt2")
    return run_dir, root / "model.pt2"
