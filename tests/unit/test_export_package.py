"""Packaging: a tiny model saved by save_final inside a fake run folder becomes a .tar.gz with
metadata, model card, requirements and hashes; verify catches tampering; unsafe archives are
refused."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from importlib import metadata as importlib_metadata
from pathlib import Path

import pytest
import torch
import yaml

from instructkit.config import AdapterConfig, DataConfig, ModelConfig, SFTConfig, TrainConfig, save_config
from instructkit.errors import UserError
from instructkit.export import package as pkg
from instructkit.export.package import extract_archive, last_metrics, package_model, verify_archive
from instructkit.models import build_tiny_model, load_model, save_final, tiny_tokenizer
from instructkit.redact import redact

X = torch.tensor([[5, 17, 300, 41, 9, 1000, 77]])

RECORDS = [
    {"step": 0, "event": "start", "total_steps": 4},
    {"step": 1, "loss": 6.9, "lr": 1e-3},
    {"step": 2, "loss": 6.5, "lr": 1e-3},
    {"step": 2, "eval_loss": 6.6, "eval_ppl": 735.1},
    {"step": 4, "loss": 6.1, "lr": 5e-4, "grad_norm": 1.5},
    {"step": 4, "eval_loss": 6.2, "eval_ppl": 492.7, "golden_loss": 6.3},
    {"step": 4, "event": "end"},
]


def make_run(root: Path, adapter: bool | str, name="sft") -> tuple[Path, object]:
    """runs/<name>/{config.yaml, metrics.jsonl, final/} as an SFT run leaves them; ``adapter``
    True is LoRA, or name the kind ("lora", "dora")."""
    run = root / "runs" / name
    run.mkdir(parents=True)
    model_cfg = ModelConfig(name_or_path="tiny-llama", device="cpu")
    kind = (adapter if isinstance(adapter, str) else "lora") if adapter else "none"
    cfg = SFTConfig(
        output_dir=str(run), model=model_cfg,
        adapter=AdapterConfig(kind=kind, r=4, alpha=8),
        data=DataConfig(train="data/alpaca_tiny.jsonl"), train=TrainConfig(max_steps=4, lr=1e-3),
    )
    save_config(cfg, run / "config.yaml")
    lines = [json.dumps(r) for r in RECORDS]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "loss": 1')  # cut line
    tok = tiny_tokenizer()
    if adapter:
        model = load_model(model_cfg, cfg.adapter, tok, "cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    else:
        model = build_tiny_model("tiny-llama", seed=1)
    save_final(model, tok, run / "final", model_cfg, cfg.adapter if adapter else None)
    return run, model.eval()


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def rewrite(archive: Path, out: Path, change) -> Path:
    """A copy of ``archive`` with ``change(dict name -> bytes)`` applied to its files."""
    files = members(archive)
    change(files)
    with tarfile.open(out, "w:gz") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return out


@pytest.fixture(scope="module")
def adapter_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    run, model = make_run(root, adapter=True)
    archive = package_model(run / "final", root / "dist")
    return root, run, model, archive


def test_adapter_package_contents_and_metadata(adapter_package):
    root, run, _, archive = adapter_package
    assert archive == root / "dist" / "sft.tar.gz"
    assert sorted(p.name for p in (root / "dist").iterdir()) == ["sft.tar.gz", "sft.tar.gz.sha256"]
    files = members(archive)
    names = {n.removeprefix("sft/") for n in files}
    assert all(n.startswith("sft/") for n in files)
    assert {"metadata.json", "README.md", "requirements.txt", "training_config.yaml",
            "adapter_config.json", "adapter_model.safetensors", "instructkit.json",
            "base/model.safetensors", "base/config.json", "tokenizer.json"} <= names

    meta = json.loads(files["sft/metadata.json"])
    assert meta["name"] == "sft" and meta["kind"] == "adapter" and meta["task"] == "causal-lm"
    assert meta["base_model"] == "tiny-llama" and meta["stage"] == "sft" and meta["method"] == "lora"
    assert meta["adapter_config"]["r"] == 4 and meta["adapter_config"]["lora_alpha"] == 8
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert meta["training_config"] == {**written, "output_dir": "sft"}  # no local path (cwd is elsewhere)
    assert yaml.safe_load(files["sft/training_config.yaml"]) == meta["training_config"]
    assert meta["metrics"]["train"] == RECORDS[4]
    assert meta["metrics"]["eval"] == RECORDS[5]
    assert meta["metrics"]["last_step"] == 4
    assert meta["run_dir"] == "sft" and meta["source"] == "final"
    for lib in ("torch", "transformers", "peft", "safetensors", "instructkit"):
        assert meta["versions"][lib] == importlib_metadata.version(lib)
    assert meta["versions"]["python"]
    assert meta["created"].endswith("Z")
    # every file but metadata.json is listed with its sha256 and size, equal to the source
    assert set(meta["files"]) == names - {"metadata.json"}
    for rel, entry in meta["files"].items():
        data = files[f"sft/{rel}"]
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        if (run / "final" / rel).is_file() and rel != "README.md":
            assert (run / "final" / rel).read_bytes() == data
    # peft's own template README was replaced by the model card
    assert meta["replaced_from_model_folder"] == ["README.md"]

    reqs = files["sft/requirements.txt"].decode().splitlines()
    for lib in ("torch", "transformers", "peft", "safetensors"):
        assert f"{lib}=={importlib_metadata.version(lib).split('+')[0]}" in reqs


def test_model_card_mentions_base_method_metrics_and_usage(adapter_package):
    _, _, _, archive = adapter_package
    card = members(archive)["sft/README.md"].decode()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "**Base model:** `tiny-llama`" in card and "LoRA adapter" in card
    assert "supervised fine-tuning" in card and "r=4, alpha=8" in card
    assert "| eval | eval_loss | 6.2 | 4 |" in card and "| train | loss | 6.1 | 4 |" in card
    assert 'PeftModel.from_pretrained(base, "sft")' in card
    assert 'AutoModelForCausalLM.from_pretrained("sft/base")' in card
    assert "apply_chat_template" in card
    assert 'instructkit generate sft --prompt' in card
    assert "instructkit verify sft.tar.gz" in card and "tar xzf sft.tar.gz" in card


def test_extracted_package_loads_as_the_card_says(adapter_package, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, model, archive = adapter_package
    report = verify_archive(archive)
    assert report["name"] == "sft" and not report["mismatched"] and not report["missing"]
    assert "adapter_model.safetensors" in report["ok"] and not report["extra"]
    folder = extract_archive(archive, tmp_path / "unpacked")
    assert folder == tmp_path / "unpacked" / "sft"
    assert sorted(p.name for p in (tmp_path / "unpacked").iterdir()) == ["sft"]
    base = AutoModelForCausalLM.from_pretrained(folder / "base")
    loaded = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X).logits, model(input_ids=X).logits)
    with pytest.raises(UserError, match="already exists"):
        extract_archive(archive, tmp_path / "unpacked")


def test_full_model_package_and_default_name(tmp_path):
    run, model = make_run(tmp_path, adapter=False, name="sft-full")
    archive = package_model(run / "final", tmp_path / "dist")
    assert archive.name == "sft-full.tar.gz"
    files = members(archive)
    meta = json.loads(files["sft-full/metadata.json"])
    assert meta["kind"] == "full" and meta["method"] == "full" and meta["adapter_config"] is None
    assert meta["model_info"]["model"]["num_key_value_heads"] == 2
    card = files["sft-full/README.md"].decode()
    assert 'AutoModelForCausalLM.from_pretrained("sft-full")' in card and "peft" not in card.split("---")[1]
    assert "full fine-tuning" in card
    verify_archive(archive)
    # a second package of the same name replaces the first, atomically
    again = package_model(run / "final", tmp_path / "dist", name="sft-full")
    assert again == archive
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["sft-full.tar.gz", "sft-full.tar.gz.sha256"]

    # a merged folder finds its run through instructkit.json's merged_from
    merged = tmp_path / "runs" / "sft-merged"
    merged.mkdir()
    for f in (run / "final").iterdir():
        (merged / f.name).write_bytes(f.read_bytes())
    info = json.loads((merged / "instructkit.json").read_text())
    info.update(merged_from=str(run / "final"), adapter="lora", base="tiny-llama")
    (merged / "instructkit.json").write_text(json.dumps(info))
    meta = json.loads(members(package_model(merged, tmp_path / "dist"))["sft-merged/metadata.json"])
    assert meta["method"] == "lora-merged" and meta["training_config"]["train"]["max_steps"] == 4
    assert meta["metrics"]["eval"]["eval_loss"] == 6.2


def test_without_run_folder(tmp_path):
    tok = tiny_tokenizer()
    model = build_tiny_model()
    save_final(model, tok, tmp_path / "plain", ModelConfig(name_or_path="tiny-llama"))
    archive = package_model(tmp_path / "plain", tmp_path / "dist", name="plain-v1")
    files = members(archive)
    meta = json.loads(files["plain-v1/metadata.json"])
    assert meta["training_config"] is None and meta["metrics"]["train"] is None
    assert "plain-v1/training_config.yaml" not in files
    assert "No metrics were found" in files["plain-v1/README.md"].decode()
    with pytest.raises(UserError, match="no config.yaml"):
        package_model(tmp_path / "plain", tmp_path / "dist", run_dir=tmp_path)


def test_verify_detects_tampering(adapter_package, tmp_path):
    _, _, _, archive = adapter_package

    def flip(files):
        data = bytearray(files["sft/adapter_model.safetensors"])
        data[-1] ^= 1
        files["sft/adapter_model.safetensors"] = bytes(data)

    bad = rewrite(archive, tmp_path / "flipped.tar.gz", flip)
    with pytest.raises(UserError, match=r"mismatched: adapter_model\.safetensors"):
        verify_archive(bad)
    report = verify_archive(bad, raise_on_error=False)
    assert report["mismatched"] == ["adapter_model.safetensors"] and "tokenizer.json" in report["ok"]
    with pytest.raises(UserError):
        extract_archive(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "sft").exists()

    gone = rewrite(archive, tmp_path / "gone.tar.gz", lambda f: f.pop("sft/base/config.json"))
    with pytest.raises(UserError, match=r"missing: base/config\.json"):
        verify_archive(gone)
    extra = rewrite(archive, tmp_path / "extra.tar.gz", lambda f: f.update({"sft/run.sh": b"rm -rf /"}))
    with pytest.raises(UserError, match=r"extra: run\.sh"):
        verify_archive(extra)

    def relist(files):  # an edited metadata.json that still parses
        meta = json.loads(files["sft/metadata.json"])
        meta["files"]["README.md"]["sha256"] = "0" * 64
        files["sft/metadata.json"] = json.dumps(meta).encode()

    with pytest.raises(UserError, match=r"mismatched: README\.md"):
        verify_archive(rewrite(archive, tmp_path / "relisted.tar.gz", relist))
    with pytest.raises(UserError, match="not an instructkit package"):
        verify_archive(rewrite(archive, tmp_path / "nometa.tar.gz", lambda f: f.pop("sft/metadata.json")))

    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive at all")
    with pytest.raises(UserError, match="not a readable"):
        verify_archive(tmp_path / "junk.tar.gz")
    blob = archive.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        verify_archive(tmp_path / "cut.tar.gz")
    with pytest.raises(UserError, match="no such archive"):
        verify_archive(tmp_path / "nope.tar.gz")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "fifo"])
def test_unsafe_members_are_refused(tmp_path, kind):
    archive = tmp_path / "evil.tar.gz"
    payload = b"owned"
    with tarfile.open(archive, "w:gz") as tar:
        ti = tarfile.TarInfo("pkg/metadata.json")
        meta = json.dumps({"files": {}}).encode()
        ti.size = len(meta)
        tar.addfile(ti, io.BytesIO(meta))
        if kind == "dotdot":
            ti = tarfile.TarInfo("pkg/../../evil.txt")
        elif kind == "absolute":
            ti = tarfile.TarInfo(str(tmp_path / "evil.txt"))
        elif kind == "symlink":
            ti = tarfile.TarInfo("pkg/link")
            ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            ti = tarfile.TarInfo("pkg/link")
            ti.type, ti.linkname = tarfile.LNKTYPE, "/etc/passwd"
        else:
            ti = tarfile.TarInfo("pkg/fifo")
            ti.type = tarfile.FIFOTYPE
        if ti.isreg():
            ti.size = len(payload)
            tar.addfile(ti, io.BytesIO(payload))
        else:
            tar.addfile(ti)
    with pytest.raises(UserError, match="unsafe archive members"):
        verify_archive(archive)
    with pytest.raises(UserError, match="unsafe"):
        extract_archive(archive, tmp_path / "dest" / "inner")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "dest" / "evil.txt").exists()
    assert not (tmp_path / "dest" / "inner").exists() or not any((tmp_path / "dest" / "inner").iterdir())


def test_bad_input(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        package_model(tmp_path / "nope", tmp_path / "dist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither config.json nor adapter_config.json"):
        package_model(tmp_path / "empty", tmp_path / "dist")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weights"):
        package_model(tmp_path / "noweights", tmp_path / "dist")
    (tmp_path / "noweights" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        package_model(tmp_path / "noweights", tmp_path / "dist")
    save_final(build_tiny_model(), tiny_tokenizer(), tmp_path / "m", ModelConfig(name_or_path="tiny-llama"))
    with pytest.raises(UserError, match="name="):
        package_model(tmp_path / "m", tmp_path / "dist", name="../escape")
    with pytest.raises(UserError, match="inside the model folder"):
        package_model(tmp_path / "m", tmp_path / "m" / "dist")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        package_model(tmp_path / "m", tmp_path / "afile")


def test_failure_leaves_no_archive(tmp_path, monkeypatch):
    save_final(build_tiny_model(), tiny_tokenizer(), tmp_path / "m", ModelConfig(name_or_path="tiny-llama"))
    real = pkg._HashingReader.read

    def broken(self, n=-1):
        if self.size > 1000:
            raise KeyboardInterrupt
        return real(self, n)

    monkeypatch.setattr(pkg._HashingReader, "read", broken)
    with pytest.raises(KeyboardInterrupt):
        package_model(tmp_path / "m", tmp_path / "dist")
    assert not (tmp_path / "dist").exists()  # the folder it made for the archive is gone too
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(KeyboardInterrupt):
        package_model(tmp_path / "m", tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    monkeypatch.undo()
    (tmp_path / "bad").mkdir()
    with pytest.raises(UserError):
        package_model(tmp_path / "bad", tmp_path / "dist2")
    assert not (tmp_path / "dist2").exists()


def test_last_metrics_and_redaction(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n{broken\n")
    got = last_metrics(p)
    assert got == {"train": RECORDS[4], "eval": RECORDS[5], "last_step": 4}
    cfg = {"log": {"wandb_api_key": "abc", "hf_token": "x", "max_new_tokens": 5},
           "model": {"tokenizer": "path/to/tok"}}
    red = redact(cfg)
    assert red["log"] == {"wandb_api_key": "***", "hf_token": "***", "max_new_tokens": 5}
    assert red["model"]["tokenizer"] == "path/to/tok"


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_of_a_real_run_packages(tmp_path, kind):
    """save_final records the run's adapter section ({kind, r, alpha}) in instructkit.json, as
    every stage does; packaging read it as the adapter's name (TypeError: unhashable dict)."""
    run, model = make_run(tmp_path, adapter=kind)
    archive = package_model(run / "final", tmp_path / "dist")
    files = members(archive)
    meta = json.loads(files["sft/metadata.json"])
    assert meta["method"] == kind and meta["kind"] == "adapter"
    assert ("DoRA adapter" if kind == "dora" else "LoRA adapter") in files["sft/README.md"].decode()
    assert "r=4, alpha=8" in files["sft/README.md"].decode()
    verify_archive(archive)


def test_dotfiles_and_outside_links_are_left_out(tmp_path, caplog):
    run, _ = make_run(tmp_path, adapter=False)
    final = run / "final"
    (final / ".env").write_text("OPENAI_API_KEY=sk-secret\n")
    (final / ".cache").mkdir()
    (final / ".cache" / "blob").write_text("x")
    outside = tmp_path / "private.txt"
    outside.write_text("private notes")
    (final / "notes.txt").symlink_to(outside)
    (final / "tokenizer_alias.json").symlink_to(final / "tokenizer.json")  # inside: kept
    with caplog.at_level("WARNING", logger="instructkit.export"):
        archive = package_model(final, tmp_path / "dist")
    files = members(archive)
    names = {n.removeprefix("sft/") for n in files}
    assert not {".env", ".cache/blob", "notes.txt"} & names
    assert files["sft/tokenizer_alias.json"] == (final / "tokenizer.json").read_bytes()
    meta = json.loads(files["sft/metadata.json"])
    assert meta["left_out"] == {"hidden": [".cache/blob", ".env"], "links_outside": ["notes.txt"]}
    assert ".env" in caplog.text and "notes.txt" in caplog.text
    assert not any(b"sk-secret" in data or b"private notes" in data for data in files.values())
    verify_archive(archive)


def test_metadata_holds_no_absolute_local_paths(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path, adapter=True)
    monkeypatch.chdir(tmp_path)
    archive = package_model(run / "final", tmp_path / "dist")
    files = members(archive)
    meta = json.loads(files["sft/metadata.json"])
    assert meta["source"] == "runs/sft/final" and meta["run_dir"] == "runs/sft"
    assert meta["training_config"]["output_dir"] == "runs/sft"
    for text in (files["sft/metadata.json"], files["sft/README.md"], files["sft/training_config.yaml"]):
        assert str(tmp_path).encode() not in text
    # outside the working folder only the folder's name is kept
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    meta = json.loads(members(package_model(run / "final", tmp_path / "dist"))["sft/metadata.json"])
    assert meta["source"] == "final" and meta["run_dir"] == "sft"


def test_verify_against_an_external_sha256(adapter_package, tmp_path):
    """A file changed together with its hash in metadata.json passes verify on its own; the
    archive's sha256, written beside it by package, catches it."""
    _, _, _, archive = adapter_package
    sidecar = Path(f"{archive}.sha256")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert sidecar.read_text() == f"{digest}  {archive.name}\n"  # sha256sum -c reads it

    def forge(files):
        files["sft/tokenizer.json"] = files["sft/tokenizer.json"] + b" "
        meta = json.loads(files["sft/metadata.json"])
        meta["files"]["tokenizer.json"] = {"sha256": hashlib.sha256(files["sft/tokenizer.json"]).hexdigest(),
                                           "size": len(files["sft/tokenizer.json"])}
        files["sft/metadata.json"] = json.dumps(meta).encode()

    forged = rewrite(archive, tmp_path / "forged.tar.gz", forge)
    verify_archive(forged)  # consistent with itself: verify alone cannot tell
    with pytest.raises(UserError, match="sha256 of the archive is .* expected " + digest[:12]):
        verify_archive(forged, sha256=digest)
    with pytest.raises(UserError, match="sha256 of the archive"):
        verify_archive(forged, sha256=str(sidecar))
    assert verify_archive(archive, sha256=digest)["archive_sha256"] == digest
    assert verify_archive(archive, sha256=str(sidecar))["archive_sha256"] == digest
    assert verify_archive(archive, sha256=digest.upper())["archive_sha256"] == digest
    with pytest.raises(UserError, match="64 hexadecimal digits or a file"):
        verify_archive(archive, sha256="abc")
