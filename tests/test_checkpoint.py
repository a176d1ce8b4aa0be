"""Files a run writes through ``atomic_write`` (configs, records, weights, checkpoints)."""
import stat

import torch

from mtsl_plugin.checkpoint import atomic_write, load_checkpoint, save_weights


def test_written_files_get_the_mode_a_new_file_gets_not_a_private_one(tmp_path, umask):
    """A run's files are as readable as the user's other files (``0o666 & ~umask``: by the group on a shared
    cluster under umask 022 or 027). They were written through ``tempfile.mkstemp``, whose files are 0o600, and
    kept that mode when renamed over the destination, unlike the table and figures beside them."""
    record = atomic_write(tmp_path / "run" / "result.json", lambda handle: handle.write(b"{}"))
    weights = save_weights(tmp_path / "run" / "model.pt", "{}", {"w": torch.ones(2)})
    for path in (record, weights):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert record.read_bytes() == b"{}" and torch.equal(load_checkpoint(weights)["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.pt", "result.json"]  # no scratch left
