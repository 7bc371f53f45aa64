"""Options, URLs, task ids and payloads: validated once, refused with the fix named."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import FrozenInstanceError, fields
from typing import Any

import pytest

from celery_pgqueue.errors import (
    CanvasTooLarge,
    ConfigurationError,
    InvalidPayload,
    PayloadNotSerializable,
    PayloadTooLarge,
    PgQueueError,
)
from celery_pgqueue.ids import NAMESPACE, job_id_for
from celery_pgqueue.options import (
    KOMBU_RETRY_KEYS,
    DatabaseURL,
    PgQueueOptions,
    mask_password,
)
from celery_pgqueue.payload import from_payload, to_payload

# -- PgQueueOptions -----------------------------------------------------------------


def test_parse_of_nothing_gives_the_documented_defaults() -> None:
    options = PgQueueOptions.parse(None)

    assert options == PgQueueOptions()
    assert PgQueueOptions.parse({}) == options
    assert options.schema == "public"
    assert options.polling_interval == 1.0
    assert options.use_notify is True
    assert options.max_payload_bytes == 65_536
    assert options.max_canvas_bytes == 1_048_576
    assert options.lease_seconds == 20.0
    assert options.default_priority == 100
    assert options.completed_retention is None
    assert options.max_logs_per_job == 25
    assert options.prune_batch_size == 1_000


def test_options_are_frozen() -> None:
    options = PgQueueOptions()

    with pytest.raises(FrozenInstanceError):
        options.lease_seconds = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("polling_interval", "0.5", 0.5),
        ("polling_interval", 2, 2.0),
        ("lease_seconds", " 45 ", 45.0),
        ("use_notify", "false", False),
        ("use_notify", "Off", False),
        ("use_notify", "0", False),
        ("use_notify", "yes", True),
        ("use_notify", "TRUE", True),
        ("use_notify", False, False),
        ("max_payload_bytes", "1024", 1024),
        ("max_payload_bytes", 2048.0, 2048),
        ("pool_size", "3", 3),
        ("completed_retention", "3600", 3600.0),
        ("completed_retention", None, None),
        ("schema", "tier_2", "tier_2"),
    ],
)
def test_parse_coerces_the_obvious_spellings(key: str, raw: Any, expected: Any) -> None:
    value = getattr(PgQueueOptions.parse({key: raw}), key)

    assert value == expected
    assert type(value) is type(expected)


def test_unknown_option_is_refused_with_a_close_match() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'polling_interval'") as raised:
        PgQueueOptions.parse({"poling_interval": 1})

    assert "'poling_interval'" in str(raised.value)


def test_unknown_option_with_no_close_match_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match="known options") as raised:
        PgQueueOptions.parse({"zzz": 1})

    assert all(f.name in str(raised.value) for f in fields(PgQueueOptions))


def test_configuration_error_is_a_value_error_and_ours() -> None:
    with pytest.raises(ValueError):
        PgQueueOptions.parse({"nope": 1})
    assert issubclass(ConfigurationError, PgQueueError)


def test_kombu_retry_keys_are_let_through() -> None:
    raw: dict[str, Any] = {key: object() for key in KOMBU_RETRY_KEYS}
    raw.update(max_retries=3, interval_start=0, interval_step=0.2, interval_max=1)

    assert PgQueueOptions.parse(raw) == PgQueueOptions()
    assert {"max_retries", "interval_start", "interval_step", "interval_max"} <= KOMBU_RETRY_KEYS
    assert {"retry_errors", "callback", "errback"} <= KOMBU_RETRY_KEYS


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("polling_interval", 0),
        ("polling_interval", -1),
        ("lease_seconds", 0.0),
        ("pool_timeout", -0.5),
        ("connect_timeout", 0),
        ("message_ttl", -3),
        ("failed_retention", 0),
        ("log_retention", -1),
        ("maintenance_interval", 0),
        ("completed_retention", 0),
        ("completed_retention", -60),
        ("max_payload_bytes", 0),
        ("max_canvas_bytes", 0),
        ("pool_size", 0),
        ("prune_batch_size", 0),
        ("max_logs_per_job", -1),
        ("max_overflow", -1),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"'{key}'"):
        PgQueueOptions.parse({key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("polling_interval", "soon"),
        ("polling_interval", True),
        ("use_notify", "maybe"),
        ("use_notify", 2),
        ("max_payload_bytes", "64k"),
        ("max_payload_bytes", 1.5),
        ("pool_size", True),
        ("pool_size", [1]),
        ("lease_seconds", None),
    ],
)
def test_values_of_the_wrong_type_are_refused_naming_the_key_and_value(
    key: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError, match=f"'{key}' expects") as raised:
        PgQueueOptions.parse({key: value})

    assert repr(value) in str(raised.value)


@pytest.mark.parametrize("schema", ["", "a" * 64, "ü" * 32, "ti\x00er", "pg_tier"])
def test_schema_names_postgresql_would_refuse_or_cut_are_refused(schema: str) -> None:
    with pytest.raises(ConfigurationError, match="'schema'"):
        PgQueueOptions.parse({"schema": schema})


@pytest.mark.parametrize(
    "schema", ["Drop;", "public; DROP TABLE jobs", "Tier", "1tier", 'ti"er', "tïer", "a" * 63]
)
def test_any_other_schema_name_is_a_name(schema: str) -> None:
    assert PgQueueOptions.parse({"schema": schema}).schema == schema


def test_max_overflow_of_zero_is_allowed() -> None:
    assert PgQueueOptions.parse({"max_overflow": 0}).max_overflow == 0


# -- DatabaseURL --------------------------------------------------------------------


def test_url_parse_reads_every_part() -> None:
    url = DatabaseURL.parse(
        "pgqueue://app%40corp:p%40ss%3Aword@db.example.com:6432/queue%20db"
        "?sslmode=require&application_name=worker"
    )

    assert url.user == "app@corp"
    assert url.password == "p@ss:word"
    assert url.host == "db.example.com"
    assert url.port == 6432
    assert url.database == "queue db"
    assert url.query == (("sslmode", "require"), ("application_name", "worker"))


def test_url_parse_without_optional_parts() -> None:
    url = DatabaseURL.parse("postgresql:///tier")

    assert (url.host, url.port, url.user, url.password, url.database) == (
        None,
        None,
        None,
        None,
        "tier",
    )


@pytest.mark.parametrize(
    "scheme", ["pgqueue", "postgresql", "postgres", "postgresql+psycopg", "PGQUEUE"]
)
def test_url_accepts_our_and_postgresqls_schemes(scheme: str) -> None:
    assert DatabaseURL.parse(f"{scheme}://u@h:5432/d").database == "d"


def test_url_renders_for_sqlalchemy_and_libpq_with_the_password() -> None:
    url = DatabaseURL.parse("pgqueue://u:p%2Fw@h:5432/d?sslmode=disable")

    assert url.sqlalchemy_url() == "postgresql+psycopg://u:p%2Fw@h:5432/d?sslmode=disable"
    assert url.libpq_url() == "postgresql://u:p%2Fw@h:5432/d?sslmode=disable"


def test_url_with_ipv6_host_round_trips() -> None:
    url = DatabaseURL.parse("pgqueue://u@[::1]:5432/d")

    assert url.host == "::1"
    assert url.libpq_url() == "postgresql://u@[::1]:5432/d"


def test_unknown_libpq_parameter_is_refused_with_a_hint() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'sslmode'") as raised:
        DatabaseURL.parse("pgqueue://u:secret@h/d?sslmod=require")

    message = str(raised.value)
    assert "'sslmod'" in message
    assert "broker_transport_options" in message
    assert "secret" not in message


def test_pgqueue_option_in_the_url_points_to_transport_options() -> None:
    with pytest.raises(ConfigurationError, match="broker_transport_options"):
        DatabaseURL.parse("pgqueue://h/d?polling_interval=1")


@pytest.mark.parametrize("port", ["abc", "70000", "-1"])
def test_bad_port_is_refused(port: str) -> None:
    with pytest.raises(ConfigurationError, match="bad port") as raised:
        DatabaseURL.parse(f"pgqueue://u:secret@h:{port}/d")

    assert "secret" not in str(raised.value)


@pytest.mark.parametrize("url", ["redis://h:6379/0", "mysql://u:p@h/d", "amqp://guest@h//"])
def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="unsupported URL scheme"):
        DatabaseURL.parse(url)


@pytest.mark.parametrize("url", ["", "just-a-host", "h:5432/d"])
def test_text_that_is_not_a_url_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="not a database URL"):
        DatabaseURL.parse(url)


def test_database_name_with_a_slash_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="bad database name"):
        DatabaseURL.parse("pgqueue://h/a/b")


def test_masked_hides_the_password_and_keeps_the_rest() -> None:
    url = DatabaseURL.parse("pgqueue://alice:s3cret@db:5432/tier?sslmode=require")

    assert url.masked() == "pgqueue://alice:**@db:5432/tier?sslmode=require"
    assert url.masked("postgresql") == "postgresql://alice:**@db:5432/tier?sslmode=require"
    assert DatabaseURL.parse("pgqueue://alice@db/tier").masked() == "pgqueue://alice@db/tier"


def test_repr_and_str_never_show_the_password() -> None:
    url = DatabaseURL.parse("pgqueue://alice:s3cret@db/tier")

    assert "s3cret" not in repr(url)
    assert "s3cret" not in str(url)
    assert "s3cret" not in repr([url])
    assert repr(url) == "DatabaseURL('pgqueue://alice:**@db/tier')"


def test_key_is_the_same_for_equivalent_spellings() -> None:
    assert (
        DatabaseURL.parse("pgqueue://u:p@h:5432/d").key()
        == DatabaseURL.parse("postgresql://u:p@h:5432/d").key()
    )
    assert (
        DatabaseURL.parse("pgqueue://u:p@h:5432/d").key()
        != DatabaseURL.parse("pgqueue://u:p@h:5432/other").key()
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "could not connect to postgresql://bob:hunter2@db:5432/x: refused",
            "could not connect to postgresql://bob:**@db:5432/x: refused",
        ),
        (
            "broker pgqueue://u:p@h/d and backend postgresql+psycopg://v:q@h/d",
            "broker pgqueue://u:**@h/d and backend postgresql+psycopg://v:**@h/d",
        ),
        ("pgqueue://nobody@h/d has no password", "pgqueue://nobody@h/d has no password"),
        ("no url here: user:pass@host", "no url here: user:pass@host"),
    ],
)
def test_mask_password_hides_passwords_in_any_text(text: str, expected: str) -> None:
    assert mask_password(text) == expected


# -- task ids ------------------------------------------------------------------------


def test_uuid_task_ids_are_the_job_id() -> None:
    task_id = uuid.uuid4()

    assert job_id_for(task_id) is task_id
    assert job_id_for(str(task_id)) == task_id
    assert job_id_for(str(task_id).upper()) == task_id


def test_custom_task_ids_map_to_a_stable_uuid5() -> None:
    first = job_id_for("order-42")

    assert first == job_id_for("order-42")
    assert first == uuid.uuid5(NAMESPACE, "order-42")
    assert first.version == 5
    assert first != job_id_for("order-43")


# -- payloads ------------------------------------------------------------------------


def kombu_message(body: Any, *, content_type: str = "application/json", **headers: Any) -> dict:
    """A message as kombu's virtual transport hands it to ``_put``."""
    text = body if isinstance(body, str) else json.dumps(body)
    return {
        "body": base64.b64encode(text.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": {"task": "tests.add", "id": "abc", **headers},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": "tag-1",
            "delivery_info": {"exchange": "ex", "routing_key": "rk"},
            "correlation_id": "abc",
            "priority": 3,
        },
    }


def test_json_body_is_stored_decoded_and_readable() -> None:
    body = [[2, 3], {"user_id": 7}, {"callbacks": None, "chain": None}]

    document, size = to_payload(kombu_message(body), limit=65_536)

    assert document["body"] == body
    assert document["body_encoding"] == "json"
    assert document["headers"]["task"] == "tests.add"
    assert (document["exchange"], document["routing_key"]) == ("ex", "rk")
    assert size == len(json.dumps(document, separators=(",", ":")).encode())


def test_per_delivery_fields_are_not_stored() -> None:
    document, _ = to_payload(kombu_message([1]), limit=65_536)

    assert "delivery_tag" not in document["properties"]
    assert "delivery_info" not in document["properties"]
    assert document["properties"]["correlation_id"] == "abc"


def test_json_payload_round_trips_to_the_same_message() -> None:
    message = kombu_message([[1, "é", None], {"k": [1.5, True]}, {}])

    document, _ = to_payload(message, limit=65_536)
    rebuilt = from_payload(json.loads(json.dumps(document)))

    decoded = json.loads(base64.b64decode(rebuilt["body"]))
    assert decoded == [[1, "é", None], {"k": [1.5, True]}, {}]
    assert rebuilt["properties"]["body_encoding"] == "base64"
    assert rebuilt["headers"] == message["headers"]
    assert rebuilt["content-type"] == "application/json"
    assert rebuilt["content-encoding"] == "utf-8"
    assert rebuilt["properties"]["correlation_id"] == "abc"
    assert rebuilt["properties"]["priority"] == 3


@pytest.mark.parametrize(
    ("content_type", "text"),
    [
        ("application/x-msgpack", "\x93\x01\x02\x03"),
        ("application/x-yaml", "- 1\n- 2\n"),
        ("application/json", "{not json"),
        ("application/json", "NaN"),
        ("application/json", '["nul \\u0000 inside"]'),
        ("application/json", "[1e400]"),
        ("application/json", "[1E20]"),
        ("application/json", '["lone \\udc00"]'),
    ],
)
def test_non_json_bodies_are_kept_encoded(content_type: str, text: str) -> None:
    message = kombu_message(text, content_type=content_type)

    document, _ = to_payload(message, limit=65_536)
    rebuilt = from_payload(document)

    assert document["body"] == message["body"]
    assert document["body_encoding"] == "base64"
    assert rebuilt["body"] == message["body"]
    assert rebuilt["properties"]["body_encoding"] == "base64"


@pytest.mark.parametrize("odd", ["nul \x00 inside", "lone \ud800", 1e20, -0.0, {"key \x00": 1}])
def test_json_that_jsonb_would_change_round_trips_and_the_rest_stays_readable(odd: Any) -> None:
    """Such values go to base64 (the body as Kombu sent it, odd header entries aside)."""
    message = kombu_message([[odd], {}, {}], argsrepr=repr(odd), odd=odd)

    document, _ = to_payload(message, limit=65_536)
    stored = json.loads(json.dumps(document))  # what any JSON column gives back
    rebuilt = from_payload(stored)

    assert document["body_encoding"] == "base64" and document["body"] == message["body"]
    assert document["headers"]["task"] == "tests.add", "the task name stays readable"
    assert "odd" not in document["headers"] and "encoded" in document
    assert rebuilt["headers"] == message["headers"]
    assert json.dumps(rebuilt["headers"]["odd"]) == json.dumps(odd), "same value, same type"


def test_a_hand_edited_encoded_section_is_refused_by_name() -> None:
    document, _ = to_payload(kombu_message([1], odd="\x00"), limit=65_536)
    document["encoded"] = {"headers": "not base64 json!"}

    with pytest.raises(InvalidPayload, match="payload 'encoded'"):
        from_payload(document)


def test_payload_over_the_limit_states_size_limit_and_option() -> None:
    message = kombu_message(["x" * 5_000])

    with pytest.raises(PayloadTooLarge) as raised:
        to_payload(message, limit=1_000)

    text = str(raised.value)
    _, size = to_payload(message, limit=10_000_000)
    assert f"{size:,} bytes" in text
    assert "1,000-byte limit" in text
    assert "max_payload_bytes" in text
    assert "'tests.add'" in text
    assert isinstance(raised.value, ValueError)


def test_payload_at_exactly_the_limit_is_accepted() -> None:
    message = kombu_message(["y" * 100])
    _, size = to_payload(message, limit=10_000)

    assert to_payload(message, limit=size)[1] == size
    with pytest.raises(PayloadTooLarge):
        to_payload(message, limit=size - 1)


@pytest.mark.parametrize(
    ("content_type", "serializer"),
    [("application/json", "json"), ("application/x-python-serialize", "pickle")],
)
def test_a_tasks_canvas_counts_under_its_own_cap(content_type: str, serializer: str) -> None:
    """args/kwargs/headers against max_payload_bytes; Celery's embed against the canvas cap."""
    from kombu.serialization import dumps

    chain = [
        {"task": "tests.add", "args": [i], "options": {"task_id": "x" * 36}} for i in range(50)
    ]
    body = [[1], {}, {"callbacks": None, "errbacks": None, "chain": chain, "chord": None}]
    _, _, raw = dumps(body, serializer=serializer)
    message = kombu_message("", content_type=content_type)
    message["body"] = base64.b64encode(raw if isinstance(raw, bytes) else raw.encode()).decode()

    _, size = to_payload(message, limit=2_000, canvas_limit=10_000)
    assert size > 2_000, "over max_payload_bytes as a whole, yet accepted"
    with pytest.raises(CanvasTooLarge, match="max_canvas_bytes") as raised:
        to_payload(message, limit=2_000, canvas_limit=1_000)
    assert isinstance(raised.value, PayloadTooLarge)
    message["headers"]["big"] = "y" * 3_000
    with pytest.raises(PayloadTooLarge, match="max_payload_bytes"):
        to_payload(message, limit=2_000, canvas_limit=10_000)


@pytest.mark.parametrize("header", [object(), {1, 2}, b"bytes", float("nan")])
def test_headers_that_are_not_json_are_refused(header: Any) -> None:
    with pytest.raises(PayloadNotSerializable, match="not JSON-serialisable") as raised:
        to_payload(kombu_message([1], extra=header), limit=65_536)

    assert isinstance(raised.value, TypeError)
