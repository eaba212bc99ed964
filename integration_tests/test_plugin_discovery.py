"""Plugin discovery in a real installed environment: a venv with sgl-adapters, the example
plugin and a broken plugin installed, checked from subprocesses of that venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "example-plugin"


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "PYTHONPATH" and not k.startswith("SGL_ADAPTERS")
    }
    env.update(extra)
    return env


def make_broken_plugin(root: Path) -> Path:
    """A distribution whose entry point imports a module that does not exist."""
    pkg = root / "broken-plugin"
    (pkg / "sgl_broken_plugin").mkdir(parents=True)
    (pkg / "sgl_broken_plugin" / "__init__.py").write_text("import no_such_module_for_sgl\n")
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "sgl-broken-plugin"
            version = "0.0.1"
            [project.entry-points.sgl_adapters]
            broken = "sgl_broken_plugin"
            [tool.setuptools]
            packages = ["sgl_broken_plugin"]
            """
        )
    )
    return pkg


def site_packages(python: Path | str) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    )
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def env_dir(tmp_path_factory):
    """A venv that sees exactly this test run's packages (never the base interpreter's) plus,
    installed into it: sgl-adapters, the example plugin and a broken plugin."""
    root = tmp_path_factory.mktemp("plugin-venv")
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(root / "venv")
    bindir = root / "venv" / ("Scripts" if sys.platform == "win32" else "bin")
    # The running env's site-packages (pip, setuptools, the project's dependencies, all from
    # the lock) come after the venv's own, so what is installed here wins.
    inherit = f"import site; site.addsitedir({str(site_packages(sys.executable))!r})\n"
    (site_packages(bindir / "python") / "_sgl_test_inherit.pth").write_text(inherit)
    pip = [str(bindir / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    pip += ["--no-build-isolation", "--no-index"]
    for target in (REPO, EXAMPLE, make_broken_plugin(root)):
        subprocess.run([*pip, "-e", str(target)], check=True, env=clean_env(), cwd=root)
    return bindir


def run_py(bindir: Path, code: str, **env: str) -> dict:
    out = subprocess.run(
        [str(bindir / "python"), "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        cwd=bindir.parent,
        check=True,
    )
    return json.loads(out.stdout)


LIST = """
    import json, warnings
    from dataclasses import asdict
    warnings.simplefilter("ignore")
    from sgl_plugins.manager import PluginManager
    pm = PluginManager().load()
    print(json.dumps({"plugins": [asdict(p) for p in pm.list_plugins()],
                      "errors": [str(e) for e in pm.errors],
                      "backends": sorted(pm.backends())}))
"""


def test_entry_points_are_discovered_with_their_origin(env_dir):
    data = run_py(env_dir, LIST)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert set(by_name) == {"local", "http", "openai", "ray", "families", "reverse"}
    assert data["backends"] == ["http", "local", "openai", "ray", "reverse"]
    reverse = by_name["reverse"]
    assert reverse["distribution"] == "sgl-adapters-example-plugin"
    assert reverse["version"] == "0.1.0" and reverse["module"] == "sgl_example_plugin"
    assert reverse["entry_point"].startswith("reverse = sgl_example_plugin")
    assert reverse["chat_templates"] == ["plain"] and not reverse["builtin"]
    local = by_name["local"]
    assert local["builtin"] and local["distribution"] == "sgl-adapters"
    assert local["entry_point"].startswith("local = sgl_plugins.builtin.local")
    assert by_name["http"]["builtin"] and by_name["http"]["entry_point"].startswith("http = ")
    [error] = data["errors"]
    assert "'broken' (entry point broken = sgl_broken_plugin from sgl-broken-plugin 0.0.1)" in error
    assert "no_such_module_for_sgl" in error


def test_allowlist_and_builtins_only(env_dir):
    only_reverse = run_py(env_dir, LIST, SGL_ADAPTERS_PLUGINS="reverse")
    assert only_reverse["backends"] == ["reverse"] and only_reverse["errors"] == []
    builtins = run_py(env_dir, LIST, SGL_ADAPTERS_LOAD_PLUGINS="0")
    assert builtins["backends"] == ["http", "local", "openai", "ray"] and builtins["errors"] == []


def test_select_the_example_backend_by_name_and_run_a_graph(env_dir):
    data = run_py(
        env_dir,
        """
        import json, warnings
        warnings.simplefilter("ignore")
        from sgl_plugins import get_backend
        from sgl_adapters.graph import CallGraph
        backend = get_backend("reverse", chat_template="chatml")
        prompts = ["shared head: one", "shared head: two", "other"]
        graph = CallGraph.from_prompts(prompts, backend.tokenizer, {"max_new_tokens": 64})
        results = backend.run_graph(graph)
        chat = backend.apply_chat_template([{"role": "user", "content": "hi"}])
        print(json.dumps({"texts": [r.text for r in results], "chat": chat,
                          "cached": [r.usage.cached_tokens for r in results],
                          "type": type(backend).__module__}))
        """,
    )
    assert data["type"] == "sgl_example_plugin"
    assert data["texts"] == ["eno :daeh derahs", "owt :daeh derahs", "rehto"]
    assert data["cached"] == [0, len("shared head: "), 0]
    assert data["chat"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_cli_lists_plugins_and_reports_the_broken_one(env_dir):
    cli = str(env_dir / "sgl-adapters")
    table = subprocess.run([cli, "plugins"], capture_output=True, text=True, env=clean_env())
    assert table.returncode == 1
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["NAME", "VERSION", "DISTRIBUTION", "MODULE", "BACKENDS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["reverse"][:5] == [
        "reverse",
        "0.1.0",
        "sgl-adapters-example-plugin",
        "sgl_example_plugin",
        "reverse",
    ]
    assert rows["local"][1:5] == [
        "(built-in)",
        "0.1.0",
        "sgl-adapters",
        "sgl_plugins.builtin.local",
    ]
    assert "plugin 'broken' (entry point broken = sgl_broken_plugin" in table.stderr
    assert table.stderr.count("error:") == 1
    ok = subprocess.run(
        [cli, "plugins", "--json"],
        capture_output=True,
        text=True,
        env=clean_env(SGL_ADAPTERS_PLUGINS="local,reverse"),
    )
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert [p["name"] for p in data["plugins"]] == ["local", "reverse"] and data["errors"] == []


def test_front_doors_drive_the_example_plugin_by_name(env_dir):
    """LangChain and DSPy reach the installed plugin through its entry point, by name only."""
    data = run_py(
        env_dir,
        """
        import json, warnings
        warnings.simplefilter("ignore")
        from sgl_adapters.langchain import ChatSGLang, SGLang
        from sgl_adapters.dspy import LM, has_engine_contract
        chat = ChatSGLang(backend="reverse", max_tokens=64)
        msg = chat.invoke("abc")
        streamed = "".join(c.content for c in chat.stream("abc"))
        llm = SGLang(backend="reverse", max_tokens=64)
        try:
            lm = LM(backend="reverse", cache=False)
            (dspy_out,) = lm(messages=[{"role": "user", "content": "xyz"}])
        except NotImplementedError as exc:
            dspy_out = f"refused: {exc}"
        print(json.dumps({"chat": msg.content, "stream": streamed, "llm": llm.invoke("abc"),
                          "dspy": dspy_out, "usage": msg.usage_metadata["input_tokens"],
                          "dspy_plugins": has_engine_contract()}))
        """,
    )
    assert data["llm"] == "cba"
    assert data["chat"] == data["stream"] and "cba" in data["chat"] and data["usage"] > 0
    if data["dspy_plugins"]:
        assert "zyx" in data["dspy"]
    else:  # DSPy 3.3's legacy LM runs on the local engine only, and says so
        assert data["dspy"].startswith("refused:") and "local backend only" in data["dspy"]
