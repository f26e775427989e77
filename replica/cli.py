"""`replica`: serve a model over HTTP, or try it in the terminal.

  replica generate --prompt "What is the capital of France?"      # bundled SmolLM2, chat template
  replica generate --model ./Llama-3.2-1B-Instruct --raw --prompt "Once upon a time"
  replica serve --model smollm2 --port 8000
  replica serve --model llama3.2:3b                 # a model of Ollama's store, by its Ollama name
  replica models                                    # what Ollama's store holds (--json for scripts)
"""
import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        from replica.server.cli import main as serve_main
        return serve_main(argv[1:])
    parser = argparse.ArgumentParser(prog="replica", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve the OpenAI and Ollama APIs (replica serve --help)")
    gen = sub.add_parser("generate", help="answer one prompt in the terminal, streaming")
    gen.add_argument("--model", default="smollm2", help="checkpoint folder, .gguf file or 'smollm2'")
    gen.add_argument("--prompt", help="the prompt (default: read standard input)")
    gen.add_argument("--system", help="a system message (chat models)")
    gen.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--verbose", action="store_true", help="log loading and cache sizing")
    models = sub.add_parser("models", help="list the models of Ollama's store (servable by name)")
    models.add_argument("--json", action="store_true", help="print JSON (one object a model)")
    args = parser.parse_args(argv)
    if args.command == "models":
        return print_models(args.json)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _generate(args)
    except ValueError as err:
        print(f"replica: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def store_rows(env: dict | None = None) -> tuple[str | None, list[dict]]:
    """(the store's path, one row a model, newest first), as `ollama list` shows them."""
    from replica.models import ollama_store

    store = ollama_store.find_store(env)
    if store is None:
        return None, []
    rows = [{"name": m.name.display, "id": m.digest[:12], "digest": m.digest,
             "size_bytes": m.size_bytes, "modified_at": m.modified_at,
             "family": m.config.get("model_family", ""), "quantization": m.config.get("file_type", "")}
            for m in ollama_store.list_models(store)]
    return str(store), rows


def print_models(as_json: bool = False, env: dict | None = None) -> int:
    """`replica models` and `fleetctl models`: exit 0 with the store's models, 1 with no store."""
    import json

    from replica.models import ollama_store

    store, rows = store_rows(env)
    if as_json:
        print(json.dumps({"store": store, "models": rows}, indent=2))
    elif store is None:
        where = ", ".join(str(p) for p in ollama_store.store_candidates(env))
        print(f"no Ollama store found (looked in {where}); set OLLAMA_MODELS", file=sys.stderr)
    else:
        print(f"{'NAME':<40} {'ID':<12} {'SIZE':>9}  {'QUANT':<7} MODIFIED")
        for r in rows:
            print(f"{r['name']:<40} {r['id']:<12} {r['size_bytes'] / 1e9:>6.2f} GB  "
                  f"{r['quantization']:<7} {r['modified_at'][:19].replace('T', ' ')}")
        print(f"({len(rows)} in {store}; serve one with `replica serve --model NAME`)")
    return 0 if store is not None else 1


def _generate(args) -> int:
    from replica.config import EngineConfig
    from replica.engine.engine import LLMEngine
    from replica.sampling_params import SamplingParams

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device))
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer files; `replica generate` needs one")
    if args.raw or not tokenizer.has_chat_template:
        ids = tokenizer.encode(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}])
    max_tokens = min(args.max_tokens, engine.max_model_len - len(ids))
    params = SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    engine.add_request("cli", ids, params)
    while engine.has_unfinished:
        for out in engine.step():
            for completion in out.outputs:
                sys.stdout.write(completion.new_text)
                sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
