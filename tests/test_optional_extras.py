"""The extras stay optional: the core modules, the CLI and a run on non-DICOM data without tracking
import none of pydicom (`dicom`), mlflow (`tracking`), lightly (`pretrain`) or selenium (`dev`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    import vision_si.cli, vision_si.loop, vision_si.review, vision_si.tracking, vision_si.data, vision_si.pretrain
    from vision_si.config import config_from_dict
    from vision_si.data import load_images, load_source
    from vision_si.data.decode import decode_image
    from vision_si.tracking import track_run

    cfg = config_from_dict({"data": {"source": "digits", "image_size": 8}})
    table = load_source(cfg.data, 0, progress=False)
    load_images(table, [0, 1], cfg.data)
    with track_run(cfg, None) as hook:  # tracking off: no hook, nothing imported
        assert hook is None
    print(sorted(m for m in ("pydicom", "mlflow", "selenium", "lightly") if m in sys.modules))
""")


def test_core_paths_import_no_optional_extra():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
