"""No secret is logged: what the tracker sends to MLflow as params, tags and config artifacts goes through redact()."""

import pytest

from flows.tracking import REDACTED, _params, _tags, redact


@pytest.mark.parametrize("value, expected", [
    ("postgresql+psycopg2://roads:s3cr3t-pw@127.0.0.1:5432/mlflow", "postgresql+psycopg2://roads:***@127.0.0.1:5432/mlflow"),
    ("https://user:tok_123@example.org/x.jsonl", "https://user:***@example.org/x.jsonl"),
    ("s3://bucket/data.parquet?X-Amz-Signature=abc123&x=1", "s3://bucket/data.parquet?X-Amz-Signature=***&x=1"),
    ("https://h/f?access_token=zzz", "https://h/f?access_token=***"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("postgresql://roads@127.0.0.1/mlflow", "postgresql://roads@127.0.0.1/mlflow"),
    ("sft.epochs=2 offline_dpo.beta=0.1", "sft.epochs=2 offline_dpo.beta=0.1"),
])
def test_passwords_in_uris_and_secret_query_arguments_are_redacted(value, expected):
    assert redact(value) == expected


def test_secret_named_keys_are_redacted_but_token_counts_are_not():
    params = {p.key: p.value for p in _params({"evaluate": {"max_new_tokens": 16, "num_tokens": 3},
                                               "hub": {"token": "hf_x", "api_key": "k", "password": "p"},
                                               "AWS_SECRET_ACCESS_KEY": "a", "tokenizer": "bpe"})}
    assert params["evaluate.max_new_tokens"] == "16" and params["evaluate.num_tokens"] == "3"
    assert params["hub.token"] == params["hub.api_key"] == params["hub.password"] == REDACTED
    assert params["AWS_SECRET_ACCESS_KEY"] == REDACTED and params["tokenizer"] == "bpe"


def test_a_secret_held_in_the_environment_is_redacted_wherever_it_appears(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SuperSecretValue42")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://roads:pg-pass-9@db/mlflow")
    tags = _tags({"roads.overrides": "tasks.hh.source=hub --token hf_SuperSecretValue42",
                  "note": "the db password pg-pass-9 leaked into text"})
    assert "hf_SuperSecretValue42" not in str(tags) and "pg-pass-9" not in str(tags)
    nested = redact({"a": ["x hf_SuperSecretValue42 y", {"b": "pg-pass-9"}], "n": 3})
    assert nested == {"a": ["x *** y", {"b": "***"}], "n": 3}


def test_a_secret_named_config_field_that_is_no_credential_survives():
    """The hidden family's ``secret`` is a seed, not a credential: a study must be reproducible from MLflow."""
    params = {p.key: p.value for p in _params({"tasks": {"hidden": {"family": "hidden", "secret": 1234}},
                                               "hub": {"token": "hf_x"}})}
    assert params["tasks.hidden.secret"] == "1234" and params["hub.token"] == REDACTED
    assert redact({"secret": 99, "password": "p"}) == {"secret": 99, "password": REDACTED}


def test_the_study_run_name_shows_overrides_without_their_secrets(monkeypatch):
    from flows.study import run_name

    monkeypatch.setenv("HF_TOKEN", "hf_SecretInAName_42")
    name = run_name("smoke", ["pipeline.description=with hf_SecretInAName_42", "db.password=pw123", "sft.epochs=2"])
    assert "hf_SecretInAName_42" not in name and "pw123" not in name
    assert name.startswith(f"smoke pipeline.description=with {REDACTED} db.password={REDACTED} sft.epochs=2 · ")
