"""Stream a chat reply token by token from a built folder: python examples/chat.py MODEL [TEXT]."""

import json
import sys

import onnxruntime_genai as og


def main(model_dir: str, text: str = "Write a haiku about rivers.") -> None:
    model = og.Model(model_dir)
    tokenizer = og.Tokenizer(model)
    stream = tokenizer.create_stream()
    messages = json.dumps(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ]
    )
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=256)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode(prompt))
    while not generator.is_done():
        generator.generate_next_token()
        print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)
    print()


if __name__ == "__main__":
    main(*sys.argv[1:])
