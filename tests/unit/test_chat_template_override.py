"""`--chat-template`: the planner's option, the launcher's, and the worker's choice."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshllm.cli.up_config import load_up_config
from meshllm.common.errors import ConfigError
from meshllm.common.types import CHAT_TEMPLATE_NAMES, ChatMessage
from meshllm.planner.config import load_config as planner_config
from meshllm.worker.engine.batch import chat

KEY = "--chat-template / MESHLLM_CHAT_TEMPLATE"
FILE_TEMPLATE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"


@pytest.fixture
def template_file(tmp_path: Path) -> Path:
    path = tmp_path / "t.jinja"
    path.write_text(FILE_TEMPLATE)
    return path


def test_planner_default_is_automatic() -> None:
    assert planner_config([], {}).chat_templates == {}


@pytest.mark.parametrize(("value", "expected"), [
    ("chatml", {"*": "name:chatml"}),
    ("gemma", {"*": "name:gemma"}),
    ("FILE", {"*": f"text:{FILE_TEMPLATE}"}),
    ("m.gguf=chatml", {"m.gguf": "name:chatml"}),
    ("gemma,m.gguf=FILE", {"*": "name:gemma", "m.gguf": f"text:{FILE_TEMPLATE}"}),
], ids=["name", "gemma", "file", "per model", "default and per-model file"])
def test_planner_chat_templates(value: str, expected: dict[str, str],
                                template_file: Path) -> None:
    value = value.replace("FILE", str(template_file))
    assert planner_config(["--chat-template", value], {}).chat_templates == expected
    assert planner_config([], {"MESHLLM_CHAT_TEMPLATE": value}).chat_templates == expected


@pytest.mark.parametrize("value", ["llama9", "m.gguf=/no/such/template.jinja", "EMPTY"],
                         ids=["unknown name", "missing file", "empty file"])
def test_planner_bad_chat_template_names_flag_and_variable(value: str, tmp_path: Path) -> None:
    (tmp_path / "empty.jinja").write_text("")
    value = value.replace("EMPTY", str(tmp_path / "empty.jinja"))
    for argv, env in (["--chat-template", value], {}), ([], {"MESHLLM_CHAT_TEMPLATE": value}):
        with pytest.raises(ConfigError) as info:
            planner_config(argv, env)
        assert info.value.key == KEY


def test_up_passes_chat_templates_and_checks_them(template_file: Path) -> None:
    cfg = load_up_config(["--worker-memory", "1GiB", "--chat-template", "chatml",
                          "--chat-template", f"m.gguf={template_file}"], {})
    assert cfg.chat_templates == ("chatml", f"m.gguf={template_file}")
    env = {"MESHLLM_CHAT_TEMPLATE": "gemma"}
    assert load_up_config(["--worker-memory", "1GiB"], env).chat_templates == ("gemma",)
    with pytest.raises(ConfigError) as info:
        load_up_config(["--worker-memory", "1GiB", "--chat-template", "nope"], {})
    assert info.value.key == KEY


def test_every_built_in_name_has_a_template_and_stops() -> None:
    assert set(chat.NAMED_TEMPLATES) == set(CHAT_TEMPLATE_NAMES)
    assert set(CHAT_TEMPLATE_NAMES) <= set(chat.FAMILY_STOPS)


GGUF_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


@pytest.mark.parametrize(("override", "gguf", "arch", "origin", "opens", "stop"), [
    ("", GGUF_TEMPLATE, "gemma3", "GGUF's own", "<user>", ()),
    ("", None, "gemma3", "family gemma", "<start_of_turn>user", ("<end_of_turn>",)),
    ("", None, "llama", "family chatml", "<|im_start|>user", ("<|im_end|>",)),
    ("name:chatml", None, "gemma3", "override chatml", "<|im_start|>user", ("<|im_end|>",)),
    ("name:chatml", GGUF_TEMPLATE, "qwen2", "override chatml", "<|im_start|>user",
     ("<|im_end|>",)),
    ("name:gemma", None, "llama", "override gemma", "<start_of_turn>user",
     ("<end_of_turn>",)),
    (f"text:{FILE_TEMPLATE}", GGUF_TEMPLATE, "gemma3", "override from file", "[user]", ()),
], ids=["gguf", "gemma family", "chatml family", "chatml over family", "chatml over gguf",
        "gemma override", "file over gguf"])
def test_template_choice(override: str, gguf: str | None, arch: str, origin: str, opens: str,
                         stop: tuple[str, ...]) -> None:
    template, said = chat.choose_template(override, gguf, arch)
    prompt = chat.render_chat(template, [ChatMessage("user", "hi")], "", "")
    assert (said, prompt.startswith(opens), template.stop) == (origin, True, stop)


@pytest.mark.parametrize("override", ["name:llama9", "text:", "chatml"])
def test_malformed_override_is_a_config_error(override: str) -> None:
    with pytest.raises(ConfigError):
        chat.choose_template(override, None, "gemma3")
