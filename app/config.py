"""Settings for every InstructLoop process, read from the environment.

Web, worker, beat and the CLI all read the same `Settings` (env prefix
`INSTRUCTLOOP_`), so a deployment is configured in one place. The embedded
default (`instructloop demo`) runs on a SQLite file and a filesystem broker
under the data dir; production points the URLs at PostgreSQL and Redis.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET_KEY = "change-me-instructloop-local-only"  # noqa: S105  a placeholder that production refuses


class Settings(BaseSettings):
    """All configuration of an InstructLoop deployment."""

    model_config = SettingsConfigDict(env_prefix="INSTRUCTLOOP_", env_file=".env", extra="ignore")

    environment: Literal["local", "demo", "test", "production"] = Field(
        "local", description="Deployment mode; 'production' refuses the default secret key."
    )
    database_url: str = Field("", description="SQLAlchemy URL; empty means a SQLite file in the data dir.")
    broker_url: str = Field("", description="Celery broker URL; empty means a filesystem broker in the data dir.")
    secret_key: str = Field(DEFAULT_SECRET_KEY, description="Signs sessions and CSRF tokens.")
    data_dir: Path = Field(Path("./instructloop-data"), description="Artifacts, models, SQLite, broker.")
    public_base_url: str = Field("http://127.0.0.1:8000", description="URL users reach the web at.")
    base_model: str = Field("", description="Path or hub id of the base model; empty means the bundled world model.")

    session_max_age_s: int = Field(7 * 24 * 3600, description="Lifetime of a login session.")
    login_max_failures: int = Field(5, description="Failed logins per account or IP before a lockout.")
    login_window_s: int = Field(300, description="Window of the login rate limit, in seconds.")
    max_body_bytes: int = Field(50 * 1024 * 1024, description="Largest request body accepted.")
    api_rate_per_token: int = Field(
        0, ge=0, description="API requests one token may make per rate window; 0: no limit. Counted in Redis."
    )
    api_rate_per_address: int = Field(
        0, ge=0, description="API requests one client address may make per rate window; 0: no limit."
    )
    api_rate_window_s: int = Field(60, ge=1, description="Window of the API rate limits, in seconds.")
    rate_limit_redis_url: str = Field(
        "", description="Redis that counts the API rate limits; empty: the broker when it is Redis."
    )
    lease_minutes: int = Field(20, description="How long a labeler holds a task before it returns.")
    run_stale_after_s: int = Field(180, description="A run with no heartbeat for this long is re-queued.")
    job_time_limit_s: int = Field(
        6 * 3600,
        ge=1,
        description="A job running longer is stopped (Celery's soft time limit) and its run fails; killed 300 s later.",
    )
    worker_torch_threads: int | None = Field(
        None,
        ge=1,
        description=(
            "torch intra-op threads per worker process; unset: the CPUs this process may use divided by the "
            "worker's concurrency, at least 1."
        ),
    )
    beat_dispatch_s: float = Field(15.0, gt=0, description="Beat: seconds between sends of runs the broker lost.")
    beat_reap_s: float = Field(60.0, gt=0, description="Beat: seconds between re-queues of runs with no heartbeat.")
    beat_expire_leases_s: float = Field(60.0, gt=0, description="Beat: seconds between returns of lapsed leases.")
    beat_retrain_s: float = Field(300.0, gt=0, description="Beat: seconds between checks for due SFT, RM, PPO runs.")
    beat_webhooks_s: float = Field(10.0, gt=0, description="Beat: seconds between webhook delivery passes.")
    retrain_min_new_demonstrations: int = Field(50, description="New demonstrations before beat retrains SFT.")
    retrain_min_new_rankings: int = Field(50, description="New rankings before beat retrains the reward model.")
    retrain_policy_algorithm: Literal["ppo", "dpo"] = Field(
        "ppo",
        description="How the schedule trains the policy: 'ppo' (SFT → reward model → PPO) or 'dpo' (SFT → DPO on "
        "the rankings, no reward model).",
    )
    retrain_failure_backoff_s: float = Field(
        3600.0,
        ge=0,
        description="A scheduled SFT, RM or PPO run that failed is not started again by the schedule for this long.",
    )
    max_prompt_chars: int = Field(20000, description="Longest prompt text accepted at import.")
    eval_after_ppo_prompts: int = Field(
        50,
        ge=0,
        le=2000,
        description="Held-out prompts of the blind evaluation started after each PPO run (0: none).",
    )
    eval_overlap: int = Field(1, ge=1, le=20, description="Labelers per prompt in scheduled evaluations.")
    webhook_allow_hosts: str = Field(
        "",
        description="Comma-separated hosts (names, addresses or networks like 10.0.0.0/8) that webhooks may reach "
        "although they are loopback, private, link-local or otherwise not public; empty: public addresses only.",
    )
    promotion_requires_eval_win: bool = Field(
        False,
        description="A policy is promoted only after winning a blind evaluation against the promoted one.",
    )

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> Settings:
        if self.environment == "production" and self.secret_key == DEFAULT_SECRET_KEY:
            raise ValueError(
                "INSTRUCTLOOP_SECRET_KEY is still the default; set a long random value "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`) "
                "before running with INSTRUCTLOOP_ENVIRONMENT=production"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'instructloop.sqlite3').resolve()}"

    @property
    def resolved_rate_limit_url(self) -> str:
        """The Redis URL the API rate limits count in; empty when there is none (the limits cannot hold)."""
        url = self.rate_limit_redis_url or self.broker_url
        return url if url.startswith(("redis://", "rediss://")) else ""

    @property
    def resolved_broker_url(self) -> str:
        """The broker URL, defaulting to the serverless filesystem transport."""
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        """Where the filesystem broker keeps its messages."""
        return (self.data_dir / "broker").resolve()

    @property
    def artifacts_dir(self) -> Path:
        """Where model versions and training runs write their files."""
        return (self.data_dir / "artifacts").resolve()

    @property
    def webhook_allowed(self) -> tuple[str, ...]:
        """The webhook allow-list, lower-cased, without blanks."""
        return tuple(h.strip().lower() for h in self.webhook_allow_hosts.split(",") if h.strip())

    @property
    def secure_cookies(self) -> bool:
        """Cookies get the Secure flag when the site is served over HTTPS."""
        return self.public_base_url.startswith("https://")


@lru_cache
def get_settings() -> Settings:
    """Returns the process-wide settings, read once from the environment."""
    return Settings()
