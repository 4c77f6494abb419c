"""`tandem` argument parsing, and `tandem generate` against an in-process fake of the public API."""
from __future__ import annotations

import io
from concurrent import futures

import grpc
import pytest

from gateway.cli import main as cli
from gateway.config import config_from_args
from gateway.cli.generate_client import GenerateOptions, build_request, run_generate
from gateway.cli.service_commands import engine_argv, gateway_argv, tokenizer_argv
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc


def test_serve_defaults() -> None:
    args = cli.parse_args(["serve"])
    assert (args.model, args.host, args.port, args.device, args.dtype) == ("default", "127.0.0.1", 50051, "auto",
                                                                          "auto")
    assert (args.metrics_port, args.http_port) == (9090, 8000)
    assert args.engine_args == []
    config = cli.launcher_config_from_args(args)
    assert config.start_timeout_s == 300.0
    assert (config.max_restarts, config.restart_window_s) == (3, 300.0)


def test_serve_restart_budget_flags_reach_the_launcher() -> None:
    config = cli.launcher_config_from_args(cli.parse_args(["serve", "--max-restarts", "5", "--restart-window", "60"]))
    assert (config.max_restarts, config.restart_window_s) == (5, 60.0)


def test_serve_flags_and_engine_passthrough_reach_the_argvs() -> None:
    args = cli.parse_args(["serve", "--model", "/m/x.gguf", "--host", "127.0.0.1", "--port", "6000",
                           "--tokenizer-port", "6001", "--engine-port", "6002", "--device", "cpu",
                           "--dtype", "float32", "--start-timeout", "12", "--",
                           "--max-num-seqs", "64", "--port", "not-for-the-launcher"])
    assert args.engine_args == ["--max-num-seqs", "64", "--port", "not-for-the-launcher"]
    topology = cli.topology_from_args(args, "/m/x.gguf")
    assert engine_argv(topology)[1:] == ["-m", "engine_svc", "--model", "/m/x.gguf", "--host", "127.0.0.1",
                                         "--port", "6002", "--device", "cpu", "--dtype", "float32",
                                         "--max-num-seqs", "64", "--port", "not-for-the-launcher"]
    assert tokenizer_argv(topology)[-2:] == ["--port", "6001"]
    assert gateway_argv(topology)[3:] == ["--host", "127.0.0.1", "--port", "6000", "--tokenizer",
                                          "127.0.0.1:6001", "--engine", "127.0.0.1:6002", "--metrics-port", "9090",
                                          "--http-port", "8000", "--drain-timeout", "8"]
    assert cli.launcher_config_from_args(args).start_timeout_s == 12.0


def test_serve_passes_the_tensor_parallel_size_to_the_engine() -> None:
    argv = engine_argv(cli.topology_from_args(cli.parse_args(["serve", "--tensor-parallel-size", "2", "--",
                                                              "--max-num-seqs", "8"]), "/m/x.gguf"))
    assert argv[-4:] == ["--tensor-parallel-size", "2", "--max-num-seqs", "8"]
    assert "--tensor-parallel-size" not in engine_argv(cli.topology_from_args(cli.parse_args(["serve"]), "/m/x.gguf"))


def test_serve_passes_the_pipeline_parallel_size_to_the_engine() -> None:
    argv = engine_argv(cli.topology_from_args(cli.parse_args(["serve", "--tensor-parallel-size", "2",
                                                              "--pipeline-parallel-size", "2"]), "/m/x.gguf"))
    assert argv[-4:] == ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"]
    assert "--pipeline-parallel-size" not in engine_argv(cli.topology_from_args(cli.parse_args(["serve"]),
                                                                               "/m/x.gguf"))


def test_serve_passes_speculative_decoding_to_the_engine() -> None:
    args = cli.parse_args(["serve", "--speculative-method", "draft", "--draft-model", "/d/small.gguf",
                           "--num-speculative-tokens", "3"])
    argv = engine_argv(cli.topology_from_args(args, "/m/x.gguf"))
    assert argv[-6:] == ["--speculative-method", "draft", "--num-speculative-tokens", "3", "--draft-model",
                         "/d/small.gguf"]
    assert "--speculative-method" not in engine_argv(cli.topology_from_args(cli.parse_args(["serve"]), "/m/x.gguf"))


def test_serve_passes_the_memory_tiers_to_the_engine() -> None:
    argv = engine_argv(cli.topology_from_args(cli.parse_args(["serve", "--cpu-offload-gb", "4", "--kv-offload-gb",
                                                              "16"]), "/m/x.gguf"))
    assert argv[-4:] == ["--cpu-offload-gb", "4", "--kv-offload-gb", "16"]
    assert "--kv-offload-gb" not in engine_argv(cli.topology_from_args(cli.parse_args(["serve"]), "/m/x.gguf"))


def test_serve_passes_the_metrics_port_on_and_0_turns_metrics_off() -> None:
    on = cli.topology_from_args(cli.parse_args(["serve", "--metrics-port", "9191"]), "/m/x.gguf")
    argv = gateway_argv(on)
    assert argv[argv.index("--metrics-port") + 1] == "9191"
    off = cli.topology_from_args(cli.parse_args(["serve", "--metrics-port", "0"]), "/m/x.gguf")
    assert "--metrics-port" not in gateway_argv(off)
    with pytest.raises(ValueError, match="ports must differ"):
        cli.topology_from_args(cli.parse_args(["serve", "--metrics-port", "50051"]), "/m/x.gguf")


def test_serve_passes_the_http_port_on_and_0_turns_the_http_api_off() -> None:
    on = cli.topology_from_args(cli.parse_args(["serve", "--http-port", "8181"]), "/m/x.gguf")
    argv = gateway_argv(on)
    assert argv[argv.index("--http-port") + 1] == "8181"
    assert config_from_args(argv[3:]).http_port == 8181   # the gateway's own parser takes it
    off = cli.topology_from_args(cli.parse_args(["serve", "--http-port", "0"]), "/m/x.gguf")
    assert "--http-port" not in gateway_argv(off)
    for clash in (["--http-port", "9090"], ["--http-port", "50051"]):
        with pytest.raises(ValueError, match="ports must differ"):
            cli.topology_from_args(cli.parse_args(["serve", *clash]), "/m/x.gguf")
    with pytest.raises(ValueError, match="must differ"):
        config_from_args(["--port", "7000", "--http-port", "7000"])


def test_serve_passes_security_limits_and_drain_to_the_gateway(tmp_path) -> None:
    args = cli.parse_args(["serve", "--tls-cert", "/c.pem", "--tls-key", "/k.pem", "--api-key-file", "/keys",
                           "--max-in-flight", "7", "--max-request-bytes", "1000", "--max-prompt-chars", "99",
                           "--drain-timeout", "20", "--log-format", "json", "--stop-grace", "3"])
    topology = cli.topology_from_args(args, "/m/x.gguf")
    assert gateway_argv(topology)[15:] == ["--tls-cert", "/c.pem", "--tls-key", "/k.pem", "--log-format", "json",
                                           "--drain-timeout", "20", "--api-key-file", "/keys", "--max-in-flight", "7",
                                           "--max-request-bytes", "1000", "--max-prompt-chars", "99"]
    assert cli.launcher_config_from_args(args).stop_grace_s == 25.0   # never kills a draining gateway
    with pytest.raises(ValueError, match="go together"):
        cli.topology_from_args(cli.parse_args(["serve", "--tls-cert", "/c.pem"]), "/m/x.gguf")


def test_serve_passes_the_kv_cache_dtype_to_the_engine_only_when_set() -> None:
    args = cli.parse_args(["serve", "--kv-cache-dtype", "fp8", "--", "--max-num-seqs", "8"])
    assert engine_argv(cli.topology_from_args(args, "/m/x.gguf"))[-4:] == ["--kv-cache-dtype", "fp8",
                                                                          "--max-num-seqs", "8"]
    assert "--kv-cache-dtype" not in engine_argv(cli.topology_from_args(cli.parse_args(["serve"]), "/m/x.gguf"))


def test_serve_takes_the_tokenizer_from_another_model() -> None:
    args = cli.parse_args(["serve", "--model", "/c/llama3-8b.json", "--tokenizer-model", "/m/x.gguf", "--",
                           "--load-format", "dummy"])
    topology = cli.topology_from_args(args, "/c/llama3-8b.json", "/m/x.gguf")
    assert tokenizer_argv(topology)[1:5] == ["-m", "tokenizer_svc", "--model", "/m/x.gguf"]
    assert engine_argv(topology)[1:5] == ["-m", "engine_svc", "--model", "/c/llama3-8b.json"]


@pytest.mark.parametrize("argv", [["serve", "--device", "tpu"], ["serve", "--start-timeout", "0"],
                                  ["serve", "--kv-cache-dtype", "int8"],
                                  ["serve", "--restart-window", "0"], ["serve", "--max-restarts", "-1"],
                                  ["generate"], ["generate", "hi", "--max-tokens", "0"], []])
def test_bad_arguments_exit_2(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2


def test_clashing_ports_are_refused_by_the_topology() -> None:
    args = cli.parse_args(["serve", "--port", "7000", "--engine-port", "7000"])
    with pytest.raises(ValueError, match="ports must differ"):
        cli.topology_from_args(args, "/m.gguf")


def test_generate_options_from_flags() -> None:
    args = cli.parse_args(["generate", "Hello", "--max-tokens", "32", "--temperature", "0", "--top-p", "0.9",
                           "--top-k", "40", "--seed", "7", "--stop", "###", "END", "--stop", "\n\n",
                           "--address", "h:1", "--timeout", "5"])
    opts = cli.generate_options_from_args(args)
    assert opts == GenerateOptions(prompt="Hello", max_tokens=32, temperature=0.0, top_p=0.9, top_k=40, seed=7,
                                   stop=("###", "END", "\n\n"))
    assert (args.address, args.timeout) == ("h:1", 5.0)


def test_generate_stop_strings_are_unescaped() -> None:
    r"""What a shell passes for `--stop "\n\n"`: a backslash and an n, twice."""
    args = cli.parse_args(["generate", "Hi", "--stop", "\\n\\n", "a\\tb", "--stop", "c:\\\\n", "\\x", "\\"])
    assert cli.generate_options_from_args(args).stop == ("\n\n", "a\tb", "c:\\n", "\\x", "\\")
    assert build_request(cli.generate_options_from_args(args)).params.stop[0] == "\n\n"


def test_plain_prompt_sends_only_the_fields_set() -> None:
    request = build_request(GenerateOptions(prompt="Hello", temperature=0.0))
    assert request.WhichOneof("input") == "prompt" and request.prompt == "Hello"
    assert request.params.HasField("temperature") and request.params.temperature == 0.0  # greedy, not unset
    for unset in ("max_tokens", "top_p", "top_k", "seed"):
        assert not request.params.HasField(unset)


def test_chat_and_system_build_a_chat() -> None:
    chat = build_request(GenerateOptions(prompt="Hi", chat=True))
    assert [(m.role, m.content) for m in chat.chat.messages] == [("user", "Hi")]
    with_system = build_request(cli.generate_options_from_args(
        cli.parse_args(["generate", "Hi", "--system", "Be brief."])))
    assert with_system.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in with_system.chat.messages] == [("system", "Be brief."), ("user", "Hi")]


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-2),
                                 dict(seed=-1), dict(stop=("",))])
def test_generate_options_are_validated(bad) -> None:
    with pytest.raises(ValueError):
        GenerateOptions(prompt="x", **bad)


class _FakeGeneration(pb_grpc.GenerationServicer):
    def GenerateStream(self, request, context):
        if request.prompt == "fail":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens exceeds the context")
        yield pb.GenerateStreamResponse(request_id="r1", text="Hel", token_ids=[1])
        yield pb.GenerateStreamResponse(request_id="r1", text="lo", token_ids=[2])
        yield pb.GenerateStreamResponse(request_id="r1", finish_reason=pb.FINISH_REASON_STOP, stop_string="###",
                                        usage=pb.Usage(prompt_tokens=3, completion_tokens=2))


@pytest.fixture
def fake_gateway():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GenerationServicer_to_server(_FakeGeneration(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_generate_streams_text_to_stdout_and_the_summary_to_stderr(fake_gateway) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_generate(GenerateOptions(prompt="Hi"), fake_gateway, 10, out, err) == 0
    assert out.getvalue() == "Hello"  # the text only, exactly as generated
    assert err.getvalue() == ("\nfinish_reason=STOP stop_string='###' prompt_tokens=3 completion_tokens=2 "
                              "request_id=r1\n")


def test_generate_reports_grpc_errors(fake_gateway) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_generate(GenerateOptions(prompt="fail"), fake_gateway, 10, out, err) == 1
    assert err.getvalue() == "error: INVALID_ARGUMENT: max_tokens exceeds the context\n"


def test_generate_main_exits_1_when_nothing_listens(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "Hi", "--address", "127.0.0.1:1", "--timeout", "5"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_bench_runs_the_benchmark_module_with_the_default_model() -> None:
    args = cli.parse_args(["bench", "scheduling", "--scenarios", "prefix-cache"])
    cmd = cli.bench_command(args, default_model="/models/smol.gguf")
    assert cmd[1:] == ["-m", "benchmarks.scheduling", "--model", "/models/smol.gguf", "--scenarios", "prefix-cache"]
    args = cli.parse_args(["bench", "decode", "--model", "x.gguf"])
    assert cli.bench_command(args, default_model="unused")[1:] == ["-m", "benchmarks.engine_decode", "--model", "x.gguf"]
    args = cli.parse_args(["bench", "cancel", "--address", "h:1"])
    assert cli.bench_command(args)[1:] == ["-m", "benchmarks.cancel_latency", "--address", "h:1"]


def test_serve_lora_reaches_the_engine_argv_with_absolute_paths(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    args = cli.parse_args(["serve", "--model", "/m/x.gguf", "--lora", "sql=adapters/sql", "--lora", "chat=/abs/c",
                           "--", "--max-loras", "2"])
    argv = engine_argv(cli.topology_from_args(args, "/m/x.gguf"))
    assert argv[-6:] == ["--lora", f"sql={tmp_path}/adapters/sql", "--lora", "chat=/abs/c", "--max-loras", "2"]


@pytest.mark.parametrize("bad", ["sql", "=path", "sql="])
def test_serve_lora_needs_name_equals_path(bad) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["serve", "--lora", bad])
    assert exit_info.value.code == 2


def test_engine_lora_flag_is_repeatable_and_turns_lora_on() -> None:
    from engine_svc.config import config_from_args

    config = config_from_args(["--model", "m", "--lora", "a=/p/a", "--lora", "b=/p/b=c"])
    assert config.lora_modules == (("a", "/p/a"), ("b", "/p/b=c")) and config.enable_lora
    plain = config_from_args(["--model", "m"])
    assert plain.lora_modules == () and not plain.enable_lora
    with pytest.raises(SystemExit):
        config_from_args(["--model", "m", "--lora", "nameonly"])


def test_prune_hands_every_argument_to_the_pruning_module() -> None:
    args = cli.parse_args(["prune", "--output", "out", "--method", "wanda", "--sparsity", "2:4", "--calib-tokens", "64"])
    assert cli.prune_command(args, default_model="/m/smol.gguf")[1:] == [
        "-m", "engine_svc.pruning", "--model", "/m/smol.gguf", "--output", "out", "--method", "wanda",
        "--sparsity", "2:4", "--calib-tokens", "64"]
    # `--model default` names the default model too; the engine's module is always given a path.
    args = cli.parse_args(["prune", "--model", "default", "--output", "o"])
    assert cli.prune_command(args, default_model="/m/smol.gguf")[3:] == ["--model", "/m/smol.gguf", "--output", "o"]
    args = cli.parse_args(["prune", "--output", "o", "--model", "/x/hf"])
    assert cli.prune_command(args, default_model="unused")[3:] == ["--output", "o", "--model", "/x/hf"]
    assert "prune" in cli.build_parser().format_help()


def test_eval_hands_every_argument_to_the_eval_module() -> None:
    # Options right after `eval` are the module's, not argparse's own (they would be refused as unknown).
    args = cli.parse_args(["eval", "--modes", "fp32", "int8", "--max-tokens", "64"])
    assert cli.eval_command(args)[1:] == ["-m", "benchmarks.quality_eval", "--modes", "fp32", "int8",
                                          "--max-tokens", "64"]
    assert cli.eval_command(cli.parse_args(["eval"]))[1:] == ["-m", "benchmarks.quality_eval"]


def test_serve_passes_quantization_to_the_engine_only_when_set() -> None:
    from engine_svc.config import QUANTIZATIONS
    assert cli.QUANTIZATIONS == QUANTIZATIONS                       # the gateway's copy of the engine's choices
    args = cli.parse_args(["serve", "--model", "/m/x.gguf", "--quantization", "int4", "--", "--max-num-seqs", "8"])
    argv = engine_argv(cli.topology_from_args(args, "/m/x.gguf"))
    assert argv[-6:] == ["--dtype", "auto", "--quantization", "int4", "--max-num-seqs", "8"]
    plain = engine_argv(cli.topology_from_args(cli.parse_args(["serve"]), "/m/x.gguf"))
    assert "--quantization" not in plain
    with pytest.raises(SystemExit):
        cli.parse_args(["serve", "--quantization", "int3"])


def test_serve_log_level_and_format_reach_every_service() -> None:
    topology = cli.topology_from_args(cli.parse_args(["serve", "--log-level", "debug", "--log-format", "json"]),
                                      "/m/x.gguf")
    for argv in (tokenizer_argv(topology), engine_argv(topology), gateway_argv(topology)):
        assert argv[argv.index("--log-level") + 1] == "debug" and argv[argv.index("--log-format") + 1] == "json"
    defaults = cli.topology_from_args(cli.parse_args(["serve"]), "/m/x.gguf")
    for argv in (tokenizer_argv(defaults), engine_argv(defaults), gateway_argv(defaults)):
        assert "--log-level" not in argv and "--log-format" not in argv   # compose's commands stay as they are
