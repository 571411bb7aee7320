"""Apply the router tokenizer wiring (proposed in bench-results/gpu/README.md) to a scratch copy.

Run on the GPU machine only, over the copy of the tree the device tool sends; never commit the
result. Each edit is skipped when already present (the router engineer may have wired it) and
fails loudly when its anchor moved.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EDITS: list[tuple[str, str, str]] = [
    (
        "router/config.py",
        '    policy: str = "least_loaded"\n',
        '    policy: str = "least_loaded"\n'
        "    # where prompt tokens come from: kvstack's tokenizer (simulators) or the engine's /tokenize\n"
        "    # (real vLLM: the model's HF tokenizer and chat template, which its KV events carry)\n"
        '    tokenizer: Literal["builtin", "engine"] = "builtin"\n',
    ),
    (
        "router/proxy.py",
        "from kvstack.router.upstream import UpstreamError, UpstreamResponse\n",
        "from kvstack.router.tokenizers import EngineTokenizer, TokenizeError, request_tokens\n"
        "from kvstack.router.upstream import UpstreamError, UpstreamResponse\n",
    ),
    (
        "router/proxy.py",
        "        self._expose_engine = ctx.settings.expose_engine_header\n",
        "        self._expose_engine = ctx.settings.expose_engine_header\n"
        "        self._engine_tokenizer: EngineTokenizer | None = None\n",
    ),
    (
        "router/proxy.py",
        "        tokens = prompt_token_ids(request, ctx.token_cache) if policy.needs_tokens else None\n",
        "        tokens = await self._prompt_tokens(request) if policy.needs_tokens else None\n",
    ),
    (
        "router/proxy.py",
        "    # ------------------------------------------------------------------ helpers\n",
        "    # ------------------------------------------------------------------ helpers\n"
        "\n"
        "    async def _prompt_tokens(self, request: ParsedRequest) -> Any:\n"
        '        """Prompt tokens as the engine prefills them (its /tokenize when so configured)."""\n'
        "        ctx = self.ctx\n"
        '        if ctx.settings.tokenizer == "builtin" or ctx.upstream is None:\n'
        "            return prompt_token_ids(request, ctx.token_cache)\n"
        "        if self._engine_tokenizer is None:\n"
        "            self._engine_tokenizer = EngineTokenizer(\n"
        "                ctx.upstream, lambda model: [e.url for e in self._available(model or None)]\n"
        "            )\n"
        "        try:\n"
        "            return await request_tokens(self._engine_tokenizer, request)\n"
        "        except TokenizeError as err:\n"
        '            log.warning("engine tokenizer failed, using the built-in one: %s", err)\n'
        "            return prompt_token_ids(request, ctx.token_cache)\n",
    ),
]


def main() -> int:
    for rel, anchor, replacement in EDITS:
        path = ROOT / rel
        text = path.read_text()
        if replacement in text:
            continue
        if text.count(anchor) != 1:
            print(f"wire_tokenizer: anchor not found once in {rel}: {anchor.strip()!r}", file=sys.stderr)
            return 1
        path.write_text(text.replace(anchor, replacement))
    print("wire_tokenizer: router wired to kvstack.router.tokenizers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
