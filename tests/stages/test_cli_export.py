"""The CLI from a trained adapter to a merged model, a GGUF file and a verified archive."""

import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli(*args, cwd=REPO):
    proc = subprocess.run([sys.executable, "-m", "instructkit", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stdout + proc.stderr


def test_sft_merge_export_package_verify(tmp_path):
    code, out = cli("sft", "configs/tiny/sft_lora.yaml", "--resume", f"output_dir={tmp_path / 'run'}",
                    "train.max_steps=2", "log.tensorboard=false")  # overrides may follow options
    assert code == 0, out
    code, out = cli("merge", tmp_path / "run" / "final", f"output={tmp_path / 'merged'}")
    assert code == 0, out
    assert (tmp_path / "merged" / "config.json").is_file()
    code, out = cli("merge", tmp_path / "run" / "final", f"output={tmp_path / 'merged'}")
    assert code == 2 and "--overwrite" in out and "Traceback" not in out, out
    code, out = cli("merge", tmp_path / "run" / "final", f"output={tmp_path / 'merged'}", "--overwrite")
    assert code == 0, out
    code, out = cli("export", tmp_path / "merged", "--format", "gguf", "--dtype", "q8_0", f"output={tmp_path / 'm.gguf'}")
    assert code == 0, out
    assert (tmp_path / "m.gguf").stat().st_size > 0
    code, out = cli("export", tmp_path / "merged", "--format", "onnx", f"output={tmp_path / 'm.onnx'}")
    assert code == 2 and "gguf" in out and "Traceback" not in out
    code, out = cli("package", tmp_path / "merged", f"output={tmp_path / 'dist'}")
    assert code == 0, out
    archive = next((tmp_path / "dist").glob("*.tar.gz"))
    code, out = cli("verify", archive)
    assert code == 0 and "ok" in out, out
    # tamper with one file: verify fails with exit code 2 and names it
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    victim = next(m for m, data in members if m.isfile() and m.name.endswith("config.json"))
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        import io

        for m, data in members:
            if m.isfile():
                data = data + b" " if m.name == victim.name else data
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            else:
                tar.addfile(m)
    code, out = cli("verify", bad)
    assert code == 2 and "config.json" in out, out
    code, out = cli("verify", bad, "--sha256", f"{archive}.sha256")
    assert code == 2 and "sha256 of the archive" in out and "Traceback" not in out, out

    # the adapter a stage wrote packages as it is (was a TypeError), and checks against its hash
    code, out = cli("package", tmp_path / "run" / "final", f"output={tmp_path / 'dist_adapter'}")
    assert code == 0 and ".sha256" in out, out
    archive = next((tmp_path / "dist_adapter").glob("*.tar.gz"))
    code, out = cli("verify", archive, "--sha256", f"{archive}.sha256")
    assert code == 0 and "matches the sha256 given" in out, out
