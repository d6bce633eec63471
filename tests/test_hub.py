"""``push_to_hub`` of a UPQ-quantized model, checked at the HTTP boundary with no network.

``huggingface_hub``'s client factory is pointed at :class:`fake_hub.FakeHub` (an ``httpx2.MockTransport``),
so ``PreTrainedModel.push_to_hub`` and ``save_pretrained(push_to_hub=True)`` run their real code paths:
create-repo, model card lookup, YAML validation, preupload, LFS batch + storage PUT + verify, NDJSON commit.
The files that arrive in the commit are then checked and a model is rebuilt from them. Sockets are
blocked for the whole module, so a request that escaped the fake server would fail too.
"""

from __future__ import annotations

import json
import socket
import struct

import httpx2
import pytest
import safetensors.torch
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import _detect_agent
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import upq_hf
from upq_hf import UPQConfig, UPQLinear
from upq_hf.packing import FORMAT_VERSION

from fake_hub import FakeHub, UnexpectedRequest

TOKEN = "hf_upqFakeTokenForTests0123456789"
REPO_ID = "user/tiny-upq"

# huggingface_hub's own LFS single-part PUT passes a file object as ``data=``, which httpx2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


# ---------------------------------------------------------------------- isolation
@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any IP connection or DNS lookup in this module is a test failure (Unix sockets stay allowed)."""
    attempts = []
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise AssertionError(f"real network connection attempted to {address!r}")
        return real_connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise AssertionError(f"real DNS lookup attempted for {host!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Online mode, a dummy token, and every cache or token file of huggingface_hub inside tmp_path."""
    for name in ("HF_OIDC_RESOURCE", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    # huggingface_hub reads these once at import: set the module constants too
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # the LFS protocol, not hf_xet's own client
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setattr(_detect_agent, "_registry", None)
    return tmp_path


@pytest.fixture
def make_hub(hub_env):
    hubs = []

    def make(upload_mode: str = "auto") -> FakeHub:
        hub = FakeHub(TOKEN, upload_mode=upload_mode).install()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.uninstall()


# ---------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    dense_dir = tmp_path_factory.mktemp("dense")
    LlamaForCausalLM(config).save_pretrained(dense_dir)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=UPQConfig(bits=2, group_size=32))
    model.eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids).logits
    return model, input_ids, logits


def upq_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, UPQLinear)}


def safetensors_metadata(data: bytes) -> dict:
    (header_len,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + header_len]).get("__metadata__", {})


def check_uploaded_checkpoint(files: dict[str, bytes], model, input_ids, logits, tmp_path) -> None:
    # config.json carries the quantization config
    config = json.loads(files["config.json"])
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == "upq"
    assert qconfig["bits"] == 2 and qconfig["group_size"] == 32

    # model.safetensors holds the packed codes and scales, exactly the model's buffers
    state = safetensors.torch.load(files["model.safetensors"])
    layers = upq_layers(model)
    assert any(name.endswith("q_proj") for name in layers)
    for name, module in layers.items():
        weight, scale = state[f"{name}.weight"], state[f"{name}.weight_scale"]
        assert weight.dtype == torch.int32 and torch.equal(weight, module.weight), name
        assert scale.dtype == torch.float16 and torch.equal(scale, module.weight_scale), name
    q_proj = [key for key in state if key.endswith("q_proj.weight")]
    assert len(q_proj) == model.config.num_hidden_layers
    assert all(state[key].dtype == torch.int32 for key in q_proj)
    # a Llama's layout is format 1's (upq_hf.packing): written so, for older upq_hf to read it too
    assert safetensors_metadata(files["model.safetensors"]).get("upq_format_version") == "1" < str(FORMAT_VERSION)

    # a model rebuilt from the uploaded files alone computes the same logits, bit for bit
    repo_dir = tmp_path / "downloaded"
    for path, data in files.items():
        (repo_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / path).write_bytes(data)
    reloaded = AutoModelForCausalLM.from_pretrained(repo_dir)
    reloaded.eval()
    assert set(upq_layers(reloaded)) == set(layers)
    assert isinstance(reloaded.config.quantization_config, UPQConfig)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, logits)


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("upload_mode", ["auto", "regular"])
def test_push_to_hub_uploads_upq_checkpoint(quantized, make_hub, tmp_path, upload_mode):
    model, input_ids, logits = quantized
    hub = make_hub(upload_mode)

    info = model.push_to_hub(REPO_ID, token=TOKEN)

    assert hub.unexpected == []
    repo = hub.repos[REPO_ID]
    assert len(repo.commits) == 1
    commit = repo.commits[0]
    assert info.oid == commit.oid and info.commit_url.endswith(f"/{REPO_ID}/commit/{commit.oid}")
    assert commit.revision == "main" and commit.summary.startswith("Upload")
    assert {"config.json", "model.safetensors", "README.md"} <= set(commit.files)
    if upload_mode == "auto":  # weights through the LFS batch + storage PUT + verify, JSON files inline
        assert commit.kinds["model.safetensors"] == "lfsFile" and commit.kinds["config.json"] == "file"
        assert hub.lfs_verified == set(hub.lfs_blobs) and len(hub.lfs_blobs) == 1
    else:
        assert set(commit.kinds.values()) == {"file"} and not hub.lfs_blobs

    # the uploaded files are what save_pretrained writes locally (the safetensors header's metadata map has no
    # fixed key order, so that file is compared by content)
    local = tmp_path / "local"
    model.save_pretrained(local)
    # save_pretrained writes the same files, the UPQ model card included
    assert sorted(p.name for p in local.iterdir()) == sorted(commit.files)
    for path in set(commit.files) - {"model.safetensors"}:
        assert commit.files[path] == (local / path).read_bytes(), path
    card = commit.files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers\n") and "  bits: 2\n" in card
    assert '"upq"' in card and "import upq_hf" in card
    uploaded, saved = commit.files["model.safetensors"], (local / "model.safetensors").read_bytes()
    assert safetensors_metadata(uploaded) == safetensors_metadata(saved)
    uploaded, saved = safetensors.torch.load(uploaded), safetensors.torch.load(saved)
    assert uploaded.keys() == saved.keys()
    assert all(uploaded[k].dtype == saved[k].dtype and torch.equal(uploaded[k], saved[k]) for k in saved)
    check_uploaded_checkpoint(commit.files, model, input_ids, logits, tmp_path)

    seen = hub.endpoints_seen()
    host = hub.host
    for expected in (f"POST {host}/api/repos/create", f"POST {host}/api/models/{{repo}}/preupload/main",
                     f"POST {host}/api/models/{{repo}}/commit/main"):
        assert expected in seen, seen
    assert (f"PUT fake-lfs-storage.invalid/{{oid}}" in seen) == (upload_mode == "auto")


def test_save_pretrained_push_to_hub(quantized, make_hub, tmp_path):
    """The other entry point, with the token taken from HF_TOKEN rather than an argument."""
    model, input_ids, logits = quantized
    hub = make_hub("auto")

    model.save_pretrained(tmp_path / "tiny-upq-2", push_to_hub=True, repo_id="user/tiny-upq-2")

    assert hub.unexpected == []
    (commit,) = hub.repos["user/tiny-upq-2"].commits
    assert commit.kinds["model.safetensors"] == "lfsFile"
    check_uploaded_checkpoint(commit.files, model, input_ids, logits, tmp_path)


def test_fake_hub_rejects_unexpected_requests(make_hub):
    hub = make_hub()
    with pytest.raises(UnexpectedRequest, match="https://.*/api/whoami-v2"):
        hub.handle(httpx2.Request("GET", f"{hub.endpoint}/api/whoami-v2"))
    with pytest.raises(UnexpectedRequest, match="Authorization"):
        hub.handle(httpx2.Request("POST", f"{hub.endpoint}/api/repos/create", json={"name": "x"}))
    assert len(hub.unexpected) == 2


def test_cli_push_uploads_folder_with_card(quantized, make_hub, tmp_path, capsys):
    import json

    from upq_hf import cli
    from upq_hf.publish import REPORT_FILE

    model, _, _ = quantized
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    (folder / REPORT_FILE).write_text(json.dumps({"base_model": "org/base", "metrics": {"fidelity_top1": 0.5}}))
    (folder / "README.md").unlink()  # push writes the card when the folder has none
    hub = make_hub("regular")
    assert cli.main(["push", str(folder), "user/cli-upq"]) == 0
    assert "pushed" in capsys.readouterr().out
    commit = hub.repos["user/cli-upq"].commits[0]
    assert {"config.json", "model.safetensors", "README.md", REPORT_FILE} <= set(commit.files)
    card = commit.files["README.md"].decode()
    assert 'base_model: "org/base"' in card and "fidelity_top1: 0.5" in card and "| fidelity_top1 | 0.5 |" in card
    assert hub.unexpected == []


def test_model_card_metadata_is_yaml_with_the_recipe():
    import yaml

    from upq_hf import UPQConfig
    from upq_hf.publish import model_card

    config = UPQConfig(bits=2, group_size=64, recipe="upq", distill={"steps": 100, "batch_size": 4, "seqlen": 256})
    card = model_card(config.to_dict(), "HuggingFaceTB/SmolLM2-135M-Instruct", {"metrics": {"ifeval": 0.31}})
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "transformers"
    assert meta["upq"]["bits"] == 2 and meta["upq"]["group_size"] == 64 and meta["upq"]["recipe"] == "upq"
    assert meta["upq"]["train_tokens"] == 100 * 4 * 256 and meta["upq"]["dataset"] == "self"
    assert meta["upq"]["metrics"]["ifeval"] == 0.31 and "int2" in meta["tags"]
    assert "from_pretrained" in card


def test_push_refuses_a_non_upq_folder(tmp_path, capsys):
    from upq_hf import cli

    (tmp_path / "config.json").write_text("{}")
    assert cli.main(["push", str(tmp_path), "user/x"]) == 2
    assert "not a UPQ checkpoint" in capsys.readouterr().err
