"""Tandem's tokenizer service: text and chat to token ids, token ids to text deltas with stop strings.

It never imports torch. Public API:
- `load_tokenizer(path)` -> `LoadedTokenizer` (an HF model directory or a GGUF file);
- `Detokenizer` (one Detokenize stream's state), `RequestDetokenizer` (one request's), `StopStringMatcher`,
  `IncrementalDecoder`, `TokenPieces` (single tokens' text);
- `TokenizerServiceConfig`, `start_server(config, loaded)` (tests, embedding), `serve(config, loaded)` (blocking).
"""
from tokenizer_svc.chat_template import ChatTemplate, ChatTemplateError
from tokenizer_svc.config import TokenizerServiceConfig
from tokenizer_svc.detokenizer import Detokenizer
from tokenizer_svc.incremental import IncrementalDecoder
from tokenizer_svc.loaded import LoadedTokenizer, NoChatTemplateError
from tokenizer_svc.loading import load_tokenizer
from tokenizer_svc.pieces import TokenPieces
from tokenizer_svc.request_detok import RequestDetokenizer, StepOutcome
from tokenizer_svc.server import SERVICE_NAME, RunningServer, serve, start_server
from tokenizer_svc.stop_strings import StopStringMatcher

__all__ = [
    "ChatTemplate", "ChatTemplateError", "Detokenizer", "IncrementalDecoder", "LoadedTokenizer",
    "NoChatTemplateError", "RequestDetokenizer", "RunningServer", "SERVICE_NAME", "StepOutcome",
    "StopStringMatcher", "TokenPieces", "TokenizerServiceConfig", "load_tokenizer", "serve", "start_server",
]
