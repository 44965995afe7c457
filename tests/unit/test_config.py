"""airoboros.config: parsing, defaults, fallbacks and the problems a user is shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from airoboros.config import DEFAULT_FLESCH, load_config, parse_config
from airoboros.errors import ConfigError


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def named(problems: list[str], key: str) -> bool:
    return any(p.startswith(f"{key}:") for p in problems)


# --- defaults ----------------------------------------------------------------------------


def test_empty_config_has_the_original_defaults() -> None:
    cfg = parse_config({})
    assert cfg.min_docsearch_score == 0.35
    assert cfg.default_count == 100
    assert cfg.default_batch_size == 5
    assert cfg.topic_request_count == 20
    assert cfg.language == "English"
    assert cfg.model == "gpt-4"
    assert cfg.output_path == "instructions.jsonl"
    assert cfg.topics_path == "topics.txt"
    assert cfg.default_flesch == DEFAULT_FLESCH
    assert cfg.unknown_keys == []


def test_none_document_is_an_empty_config() -> None:
    # An empty YAML file parses to None.
    assert parse_config(None).default_count == 100


def test_non_mapping_document_is_one_clear_error() -> None:
    problems = problems_of(["model", "gpt-4"])
    assert len(problems) == 1
    assert "expected a mapping" in problems[0]


# --- every problem at once -----------------------------------------------------------------


def test_two_bad_keys_are_both_reported_by_name() -> None:
    problems = problems_of({"default_count": -1, "max_concurrency": "lots"})
    assert named(problems, "default_count")
    assert named(problems, "max_concurrency")
    assert len(problems) == 2


def test_bad_instructor_key_names_its_full_path() -> None:
    problems = problems_of({"instructors": {"general": {"count": -3, "batch_size": 0}}})
    assert named(problems, "instructors.general.count")
    assert named(problems, "instructors.general.batch_size")


def test_error_message_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"default_count": -1, "default_batch_size": 0})
    text = str(info.value)
    assert "2 problems" in text
    assert "default_count" in text
    assert "default_batch_size" in text


def test_semantic_problems_are_all_reported_together() -> None:
    problems = problems_of(
        {
            "response_filters": ["fine", "(unclosed"],
            "max_cost": 5,
            "model": "my-local-llm",
            "instructors": {"coding": {"count": 3}},
        }
    )
    assert named(problems, "response_filters.1")
    assert not named(problems, "response_filters.0")
    assert named(problems, "prices.my-local-llm")
    assert named(problems, "instructors.coding.coding_languages")


def test_schema_and_semantic_problems_are_reported_together() -> None:
    problems = problems_of(
        {
            "default_count": -1,
            "response_filters": ["(unclosed"],
            "instructors": {"coding": {"count": -2}},
        }
    )
    assert named(problems, "default_count")
    assert named(problems, "response_filters.0")
    assert named(problems, "instructors.coding.count")
    assert named(problems, "instructors.coding.coding_languages")


# --- api_params --------------------------------------------------------------------------


def test_api_params_defaults_when_none_given() -> None:
    cfg = parse_config({"instructors": {"general": {}}})
    assert cfg.api_params_for("general") == {
        "temperature": 1.0,
        "top_p": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
    }


def test_api_params_overlay_keeps_explicit_zero_temperature() -> None:
    cfg = parse_config(
        {
            "api_params": {"temperature": 0.7, "top_p": 0.9},
            "instructors": {
                "general": {"api_params": {"temperature": 0}},
                "writing": {},
            },
        }
    )
    general = cfg.api_params_for("general")
    assert general["temperature"] == 0
    assert general["top_p"] == 0.9  # global overlay survives
    writing = cfg.api_params_for("writing")
    assert writing["temperature"] == 0.7
    # The global zero also wins over the built-in default.
    cfg0 = parse_config({"api_params": {"temperature": 0}, "instructors": {"general": {}}})
    assert cfg0.api_params_for("general")["temperature"] == 0
    assert cfg0.api_params_for_topics()["temperature"] == 0


def test_api_params_never_carry_the_model() -> None:
    cfg = parse_config({"instructors": {"general": {"api_params": {"model": "llama-3"}}}})
    assert "model" not in cfg.api_params_for("general")


# --- per-instructor model and fallbacks --------------------------------------------------------


def test_per_instructor_model_from_model_key_and_api_params() -> None:
    cfg = parse_config(
        {
            "model": "gpt-4o",
            "instructors": {
                "general": {"model": "qwen-72b"},
                "writing": {"api_params": {"model": "llama-3-70b"}},
                "coding": {"coding_languages": ["python"]},
                "trivia": {"model": "explicit", "api_params": {"model": "ignored"}},
            },
        }
    )
    assert cfg.model_for("general") == "qwen-72b"
    assert cfg.model_for("writing") == "llama-3-70b"
    assert cfg.model_for("coding") == "gpt-4o"
    assert cfg.model_for("trivia") == "explicit"


def test_count_and_batch_size_fall_back_to_defaults() -> None:
    cfg = parse_config(
        {
            "default_count": 40,
            "default_batch_size": 7,
            "instructors": {
                "general": {"count": 12, "batch_size": 3},
                "writing": {},
                "trivia": {"count": 0},
            },
        }
    )
    assert cfg.count_for("general") == 12
    assert cfg.batch_size_for("general") == 3
    assert cfg.count_for("writing") == 40
    assert cfg.batch_size_for("writing") == 7
    # An explicit 0 is a count, not "unset".
    assert cfg.count_for("trivia") == 0


def test_language_and_docsearch_score_fall_back() -> None:
    cfg = parse_config(
        {
            "language": "French",
            "instructors": {
                "general": {"language": "German", "min_docsearch_score": 0},
                "writing": {},
            },
        }
    )
    assert cfg.language_for("general") == "German"
    assert cfg.language_for("writing") == "French"
    assert cfg.min_docsearch_score_for("general") == 0
    assert cfg.min_docsearch_score_for("writing") == 0.35


# --- max_cost and prices -----------------------------------------------------------------------


def test_max_cost_with_unpriced_model_names_prices_key() -> None:
    problems = problems_of({"max_cost": 10, "model": "my-local-llm"})
    assert named(problems, "prices.my-local-llm")


def test_max_cost_with_unpriced_instructor_model_names_it() -> None:
    problems = problems_of(
        {"max_cost": 10, "model": "gpt-4o", "instructors": {"general": {"model": "mystery"}}}
    )
    assert named(problems, "prices.mystery")
    assert not named(problems, "prices.gpt-4o")


def test_max_cost_with_user_price_is_fine() -> None:
    cfg = parse_config(
        {
            "max_cost": 10,
            "model": "my-local-llm",
            "prices": {"my-local-llm": {"prompt": 1.0, "completion": 2.0}},
        }
    )
    price = cfg.price_for("my-local-llm")
    assert price is not None
    assert (price.prompt, price.completion) == (1.0, 2.0)


def test_dated_snapshots_are_priced_like_their_family() -> None:
    cfg = parse_config({"max_cost": 1, "model": "gpt-4o-2024-05-13"})
    price = cfg.price_for("gpt-4o-2024-05-13")
    assert price is not None
    assert (price.prompt, price.completion) == (2.5, 10.0)
    assert cfg.price_for("gpt-4-0613") is not None
    assert cfg.price_for("gpt-4-0613").prompt == 30.0  # type: ignore[union-attr]


# --- regex, instructor validation ------------------------------------------------------------


def test_invalid_regex_in_response_filters_is_named() -> None:
    problems = problems_of({"response_filters": ["ok", "[unclosed"]})
    assert len(problems) == 1
    assert problems[0].startswith("response_filters.1:")
    assert "regular expression" in problems[0]


def test_coding_without_coding_languages_is_an_error() -> None:
    problems = problems_of({"instructors": {"coding": {"count": 5}}})
    assert named(problems, "instructors.coding.coding_languages")
    cfg = parse_config({"instructors": {"coding": {"coding_languages": ["python", "rust"]}}})
    assert cfg.instructor("coding").extra("coding_languages") == ["python", "rust"]


# --- files ---------------------------------------------------------------------------------


def test_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert len(info.value.problems) == 1
    assert "not found" in info.value.problems[0]
    assert str(missing) in info.value.problems[0]


def test_invalid_yaml_is_one_clear_error_with_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: gpt-4\ninstructors: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert "not valid YAML" in info.value.problems[0]
    assert "line" in info.value.problems[0]


def test_load_config_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "model: gpt-4o\napi_params:\n  temperature: 0\ninstructors:\n  general:\n    count: 3\n",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert cfg.model == "gpt-4o"
    assert cfg.count_for("general") == 3
    assert cfg.api_params_for("general")["temperature"] == 0


def test_unknown_top_level_keys_are_kept_as_warnings(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model: gpt-4\nzeta_key: 1\nalpha_key: x\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.unknown_keys == ["alpha_key", "zeta_key"]


def test_resolved_database_url_defaults_beside_output(tmp_path: Path) -> None:
    out = tmp_path / "data" / "out.jsonl"
    cfg = parse_config({"output_path": str(out)})
    expected = out.resolve().with_name("out.jsonl.sqlite")
    assert cfg.resolved_database_url() == f"sqlite+aiosqlite:///{expected}"
    explicit = parse_config({"database_url": "postgresql+asyncpg://u@h/db"})
    assert explicit.resolved_database_url() == "postgresql+asyncpg://u@h/db"
