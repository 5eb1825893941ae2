"""Stream a chat reply token by token from a built folder: python examples/chat.py MODEL [TEXT].

`internlm2-graph chat MODEL` is the interactive version; both use internlm2_graph.chat.Chat.
"""

import sys

from internlm2_graph.chat import Chat
from internlm2_graph.runtime import MissingRuntime


def main(model_dir: str, text: str = "Write a haiku about rivers.") -> None:
    try:
        chat = Chat(model_dir, system="You are a helpful assistant.", search={"max_length": 256})
    except MissingRuntime as err:
        sys.exit(f"error: {err}")
    chat.reply(text, lambda piece: print(piece, end="", flush=True))
    print()


if __name__ == "__main__":
    main(*sys.argv[1:])
