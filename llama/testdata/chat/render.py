#!/usr/bin/python3
"""Renders chat templates the way Hugging Face transformers' apply_chat_template
does (jinja2's ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks,
loop controls, transformers' tojson, raise_exception and strftime_now), as the
oracle of sbora-serve's Go renderer.

Input on stdin: a JSON list of cases {"template", "messages", "tools",
"documents", "add_generation_prompt", "bos_token", "eos_token", "now"
("%Y-%m-%d" date strftime_now sees), "extra" (more variables)}. Output: a JSON
list of {"text"} or {"error"}, one per case.
"""
import json
import sys
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def environment(now):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides jinja's tojson (which escapes HTML characters)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return now.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def main():
    out = []
    for case in json.load(sys.stdin):
        now = datetime.strptime(case.get("now") or "2024-07-26", "%Y-%m-%d")
        try:
            t = environment(now).from_string(case["template"])
            kwargs = dict(case.get("extra") or {})
            kwargs.update(messages=case["messages"], add_generation_prompt=case.get("add_generation_prompt", False),
                          bos_token=case.get("bos_token", ""), eos_token=case.get("eos_token", ""))
            if case.get("tools") is not None:
                kwargs["tools"] = case["tools"]
            if case.get("documents") is not None:
                kwargs["documents"] = case["documents"]
            out.append({"text": t.render(**kwargs)})
        except Exception as e:  # noqa: BLE001 - every failure is reported to the caller
            out.append({"error": "%s: %s" % (type(e).__name__, e)})
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
