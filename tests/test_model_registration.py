"""Bring your own model (issue 16): register tiny GPT-2, Llama and Qwen2 models, let a real worker validate them.

The models are built here with random weights and their own tokenizers (one with a chat template, one
without a pad token) and saved where the worker process can load them. What can be checked at once is a
4xx naming the field; what only loading the model shows (an encoder, corrupt weights, a folder that is not
a model, a tokenizer too big for the embedding) ends the version `failed` with the reason, never promoted.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from app.models import Completion, ModelVersion, Prompt, TrainingRun
from app.security import create_api_token
from tests.conftest import DATA_DIR, ROOT, wait_until
from tests.factories import AdminFactory, ModelVersionFactory, bind_factories

CLI = [sys.executable, "-m", "app.cli", "models"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


# --- tiny models, built and saved once per test run ---------------------------------------------------


def _char_tokenizer(alphabet: str, with_pad: bool = True):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"] if with_pad else ["<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate([*specials, *alphabet])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>" if with_pad else None,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _save(model, tokenizer, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_models(root: Path) -> dict[str, Path]:
    """Saves the good and the bad models under `root`; returns their folders by name."""
    import torch
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from app.world import corpus
    from worker.world_model import train_tokenizer

    if (root / "done").exists():
        return {p.name: p for p in root.iterdir() if p.is_dir()}
    torch.manual_seed(0)
    out: dict[str, Path] = {}
    # GPT-2: a character tokenizer with no pad token (validation must set one).
    tok = _char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 .,?!+-=\n", with_pad=False)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=1,
            n_head=2,
            n_positions=64,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    out["gpt2"] = _save(gpt2, tok, root / "gpt2")
    # Llama: a byte-level BPE tokenizer with a chat template.
    tok = train_tokenizer(list(corpus(200, seed=1)), vocab_size=300)
    tok.chat_template = CHAT_TEMPLATE
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=96,
        )
    )
    out["llama"] = _save(llama, tok, root / "llama")
    # Qwen2: a wider character tokenizer (letters of both cases).
    tok = _char_tokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!+-=\n")
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
        )
    )
    out["qwen2"] = _save(qwen, tok, root / "qwen2")
    # Bad ones: an encoder (BERT), corrupt weights, a folder with no model, a tokenizer bigger than the embedding.
    tok = _char_tokenizer("abcdefghijklmnopqrstuvwxyz ")
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    out["bert"] = _save(bert, tok, root / "bert")
    corrupt = _save(gpt2, _char_tokenizer("abc", with_pad=False), root / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out["corrupt"] = corrupt
    (root / "notamodel").mkdir(exist_ok=True)
    (root / "notamodel" / "README.txt").write_text("just some notes\n")
    out["notamodel"] = root / "notamodel"
    small = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    out["mismatch"] = _save(small, _char_tokenizer("abcdefghijklmnopqrstuvwxyz"), root / "mismatch")
    (root / "done").write_text("")
    return out


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, Path]:
    return build_models(DATA_DIR / "byom-models")


# --- checks made at once (no worker) ---------------------------------------------------------------------


def _admin_headers(db) -> dict[str, str]:
    raw, _ = create_api_token(db, AdminFactory(), ["admin"])
    return {"Authorization": f"Bearer {raw}"}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"source": "/nonexistent/model/folder", "name": "m1"}, 422, "source"),
        ({"source": "", "name": "m1"}, 422, "source"),
        ({"source": "owner/model", "name": "m1", "kind": "critic"}, 422, "kind"),
        ({"source": "owner/model", "name": "  "}, 422, "name"),
        ({"source": "not a hub id!", "name": "m1"}, 422, "source"),
        ({"source": "owner/model", "name": "taken"}, 409, "name"),
    ],
)
def test_what_can_be_checked_at_once_is_refused_at_once_naming_the_field(client, db, body, status, field):
    ModelVersionFactory(name="taken")
    headers = _admin_headers(db)
    before = db.query(ModelVersion).count(), db.query(TrainingRun).count()
    response = client.post("/api/v1/models", json=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["detail"].startswith(f"{field}:"), response.json()
    db.expire_all()
    assert (db.query(ModelVersion).count(), db.query(TrainingRun).count()) == before  # nothing left behind


def test_registration_answers_202_validating_and_queues_one_validate_run(client, db, tiny_models):
    headers = _admin_headers(db)
    response = client.post(
        "/api/v1/models", json={"source": str(tiny_models["gpt2"]), "name": "mine", "promote": True}, headers=headers
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "validating" and body["source"] == str(tiny_models["gpt2"].resolve())
    assert body["error"] is None and body["facts"] == {}
    run = db.get(TrainingRun, body["training_run_id"])
    assert run.kind == "validate" and run.params == {"version_id": body["id"], "promote": True}
    assert client.get("/api/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401


# --- the worker validates -----------------------------------------------------------------------------


def _settled(client, headers, version_id: int, timeout: float = 180) -> dict:
    return wait_until(
        lambda: (
            (v := client.get(f"/api/v1/models/{version_id}", headers=headers).json())["status"] != "validating" and v
        ),
        timeout=timeout,
        message=f"model version {version_id} to be validated",
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_architectures_validate_through_api_and_cli_and_one_samples_a_batch(
    committed_session, worker_client, celery_worker, tiny_models
):
    db = committed_session
    bind_factories(db)
    headers = _admin_headers(db)
    db.commit()
    ids = {}
    for arch in ("gpt2", "llama", "qwen2"):
        response = worker_client.post(
            "/api/v1/models",
            json={"source": str(tiny_models[arch]), "name": f"my-{arch}", "promote": arch == "qwen2"},
            headers=headers,
        )
        assert response.status_code == 202, response.text
        ids[arch] = response.json()["id"]
    facts = {}
    for arch, version_id in ids.items():
        version = _settled(worker_client, headers, version_id)
        assert version["status"] in ("ready", "promoted"), version["error"]
        facts[arch] = version["facts"]
    assert facts["gpt2"]["architecture"] == "GPT2LMHeadModel" and facts["gpt2"]["context_length"] == 64
    assert facts["llama"]["architecture"] == "LlamaForCausalLM" and facts["llama"]["context_length"] == 96
    assert facts["qwen2"]["architecture"] == "Qwen2ForCausalLM" and facts["qwen2"]["context_length"] == 128
    assert facts["llama"]["has_chat_template"] and not facts["gpt2"]["has_chat_template"]
    assert facts["gpt2"]["pad_token_set"] is False and facts["qwen2"]["pad_token_set"] is True
    assert facts["gpt2"]["pad_token"] == "</s>"  # validation gave it the EOS token
    for arch in ids:
        assert facts[arch]["dtype"] == "float32" and facts[arch]["parameters"] > 1000
        assert facts[arch]["vocab_size"] == facts[arch]["tokenizer_size"]
        assert facts[arch]["sample_generation"]["tokens"] >= 1
    # The first base became the promoted one (first of its kind); the one that asked took over.
    statuses = {a: worker_client.get(f"/api/v1/models/{i}", headers=headers).json()["status"] for a, i in ids.items()}
    assert statuses == {"gpt2": "ready", "llama": "ready", "qwen2": "promoted"}
    run = db.scalar(select(TrainingRun).where(TrainingRun.kind == "validate").order_by(TrainingRun.id))
    assert run.status == "succeeded"

    # The CLI: same code path, --wait, and the list.
    cli = subprocess.run(
        [*CLI, "register", str(tiny_models["llama"]), "--name", "cli-llama", "--kind", "sft", "--wait"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    first, last = cli.stdout.split("\n")[:2]
    assert first.endswith(" validating") and last.endswith((" ready", " promoted"))
    listing = subprocess.run([*CLI, "list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    row = next(line.split("\t") for line in listing.stdout.splitlines() if "\tcli-llama\t" in line)
    assert row[2] == "sft" and row[3] in ("ready", "promoted") and int(row[4]) == facts["llama"]["parameters"]
    assert row[5] == str(tiny_models["llama"].resolve())

    # Sample a batch from one of them through the worker.
    from app.collection.batches import create_batch, start_batch
    from app.world import generate_prompts

    batch = create_batch(
        db,
        name=f"byom-{time.monotonic_ns()}",
        k=4,
        wants_demonstrations=False,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=8,
        policy_version_id=ids["llama"],
    )
    for i, p in enumerate(generate_prompts(3, seed=7)):
        db.add(Prompt(batch_id=batch.id, text=p.text, normalized_key=f"{i:064x}", split="train"))
    db.flush()
    start_batch(db, batch)
    db.commit()
    sample = wait_until(
        lambda: (
            (db.expire_all(), r := db.scalar(select(TrainingRun).where(TrainingRun.batch_id == batch.id)))[1]
            and r.status in ("succeeded", "failed")
            and r
        ),
        timeout=180,
        message="the sampling run",
    )
    assert sample.status == "succeeded", sample.error
    assert sample.metrics["prompts_sampled"] == 3 and sample.metrics["model_version_id"] == ids["llama"]
    db.expire_all()
    made_by = db.scalars(
        select(Completion.model_version_id)
        .join(Prompt, Prompt.id == Completion.prompt_id)
        .where(Prompt.batch_id == batch.id)
    ).all()
    assert made_by == [ids["llama"]] * 12  # K = 4 outputs for each of the 3 prompts, all from the registered model


BAD = {
    "bert": "not a causal language model",
    "corrupt": "cannot load the weights",
    "notamodel": "no config.json",
    "mismatch": "the tokenizer does not belong to this model",
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_models_the_worker_finds_unusable_end_failed_with_the_reason_never_promoted(
    committed_session, worker_client, celery_worker, tiny_models
):
    db = committed_session
    bind_factories(db)
    headers = _admin_headers(db)
    db.commit()
    ids = {}
    for bad in BAD:
        response = worker_client.post(
            "/api/v1/models",
            json={"source": str(tiny_models[bad]), "name": f"bad-{bad}", "promote": True},
            headers=headers,
        )
        assert response.status_code == 202, response.text
        ids[bad] = response.json()["id"]
    for bad, reason in BAD.items():
        version = _settled(worker_client, headers, ids[bad])
        assert version["status"] == "failed", (bad, version)
        assert reason in version["error"], (bad, version["error"])
        assert version["promoted_at"] is None and version["facts"] == {}
        run = db.get(TrainingRun, version["training_run_id"])
        db.refresh(run)
        assert run.status == "failed" and reason in run.error
    db.expire_all()
    assert db.scalar(select(ModelVersion).where(ModelVersion.status == "promoted")) is None
    # The CLI's --wait exits non-zero and prints the reason.
    cli = subprocess.run(
        [*CLI, "register", str(tiny_models["bert"]), "--name", "cli-bert", "--wait", "--timeout", "180"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 1 and "not a causal language model" in cli.stderr, (cli.stdout, cli.stderr)
    assert cli.stdout.split("\n")[1].endswith(" failed")


def test_the_configured_base_model_is_registered_once_by_migrate(committed_session, tiny_models):
    import os

    env = {**os.environ, "INSTRUCTLOOP_BASE_MODEL": str(tiny_models["qwen2"])}
    outs = [
        subprocess.run([sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True)
        for _ in range(2)
    ]
    assert [o.returncode for o in outs] == [0, 0], outs[0].stderr
    said = [" ".join(o.stderr.split()) for o in outs]  # the console wraps long lines
    versions = committed_session.scalars(select(ModelVersion)).all()
    assert f"registered version {versions[0].id} (base-qwen2" in said[0]
    assert f"already registered as version {versions[0].id} " in said[1]
    assert [(v.kind, v.status, v.source, v.name) for v in versions] == [
        ("base", "validating", str(tiny_models["qwen2"].resolve()), "base-qwen2")
    ]
    run = committed_session.get(TrainingRun, versions[0].training_run_id)
    assert run.kind == "validate" and run.params["promote"] is True
    bad = subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"],
        cwd=ROOT,
        env={**env, "INSTRUCTLOOP_BASE_MODEL": "/no/such/model"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "does not exist" in " ".join(bad.stderr.split())


def test_the_admin_page_registers_through_the_same_path_and_shows_validation(client, db, login, tiny_models):
    admin = AdminFactory()
    csrf = login(admin.username)
    form = {"csrf_token": csrf, "source": "/no/such/folder", "name": "page-model", "kind": "base"}
    refused = client.post("/admin/models", data=form)
    assert refused.status_code == 422 and "source: /no/such/folder does not exist" in refused.text
    assert 'value="page-model"' in refused.text  # the form keeps what was typed
    form["source"] = str(tiny_models["gpt2"])
    done = client.post("/admin/models", data={**form, "promote": "true"}, follow_redirects=False)
    assert done.status_code == 303, done.text
    version = db.scalar(select(ModelVersion).where(ModelVersion.name == "page-model"))
    assert done.headers["location"] == f"/admin/models/{version.id}" and version.status == "validating"
    assert db.get(TrainingRun, version.training_run_id).params["promote"] is True
    page = client.get(done.headers["location"]).text
    assert 'data-testid="validation-progress"' in page and 'http-equiv="refresh"' in page
    # What the worker leaves behind is shown: the reason of a failure, the facts of a success.
    version.status, version.error = "failed", "ModelInvalid: BertForMaskedLM is not a causal language model"
    db.flush()
    page = client.get(done.headers["location"]).text
    assert "BertForMaskedLM is not a causal language model" in page and 'http-equiv="refresh"' not in page
    version.status, version.error, version.facts = (
        "ready",
        None,
        {"architecture": "GPT2LMHeadModel", "parameters": 16352},
    )
    db.flush()
    page = client.get(done.headers["location"]).text
    assert 'data-testid="facts"' in page and "GPT2LMHeadModel" in page and "16352" in page
    duplicate = client.post("/admin/models", data=form)
    assert duplicate.status_code == 409 and "name: a model version called" in duplicate.text


@pytest.mark.slow
def test_a_hub_model_is_pinned_to_the_validated_revision(tmp_path, tiny_models):
    """A hub id (here served from a prepared offline hub cache) is saved under pin_to, with its commit."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--test-org--tiny-llama"
    shutil.copytree(tiny_models["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "import json, sys; from pathlib import Path; from worker.validate import validate_model; "
        "facts = validate_model('test-org/tiny-llama', 'base', 'main', device='cpu', pin_to=Path(sys.argv[1])); "
        "print(json.dumps(facts))"
    )
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    pinned = tmp_path / "pinned"
    done = subprocess.run(
        [sys.executable, "-c", code, str(pinned)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    facts = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert facts["pinned"] == str(pinned) and facts["commit"] == commit and facts["revision"] == "main"
    assert (pinned / "config.json").is_file() and (pinned / "tokenizer_config.json").is_file()
    from worker.modeling import load_model

    model, _ = load_model(pinned, device="cpu")
    assert sum(p.numel() for p in model.parameters()) == facts["parameters"]
    # A local folder is used where it lies: nothing is copied.
    from worker.validate import validate_model

    local = validate_model(str(tiny_models["llama"]), "base", device="cpu", pin_to=tmp_path / "not-made")
    assert "pinned" not in local and not (tmp_path / "not-made").exists()
