"""The benchmark's results as text tables for the terminal, and the name of the machine."""
import os
import platform

import torch


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0]
    return platform.processor() or platform.machine()


def tables(results):
    """The results as text tables for the terminal."""
    s, m = results["settings"], results["machine"]
    lines = [f"{m['device']} ({m['device_name']}), {m['threads']} threads, torch {m['torch']}, "
             f"{m['processes']} process(es), parallel: {m['parallel']}",
             f"model: {s['n_layer']} layers, {s['n_head']} heads, {s['n_embd']} wide, block "
             f"{s['block_size']}, vocab {results['vocab_size']} ({results['vocab_source']}), "
             f"{results['params']:,} parameters"]
    if results["train"]:
        first = results["train"][0]
        lines += ["", f"training: {s['batch_size']} x {s['block_size']} tokens x "
                  f"{s['gradient_accumulation_steps']} micro-steps = {first['tokens_per_iter']:,} "
                  f"tokens per iteration; median of {s['timed_steps']} after "
                  f"{s['warmup_steps']} warm-up",
                  f"{'dtype':<10}{'compile':<9}{'warm-up s':>10}{'ms/iter':>9}{'min':>8}"
                  f"{'max':>8}{'tokens/s':>10}{'MFU':>9}{'state MiB':>11}  peak memory"]
        for r in results["train"]:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "unknown"
            lines.append(f"{r['dtype']:<10}{str(r['compile']).lower():<9}{r['warmup_s']:>10.1f}"
                         f"{r['ms_per_iter']:>9.1f}{min(r['ms_per_iter_all']):>8.1f}"
                         f"{max(r['ms_per_iter_all']):>8.1f}{r['tokens_per_s']:>10,.0f}"
                         f"{mfu:>9}{r['state_bytes'] / 2 ** 20:>11,.0f}  "
                         f"{r['peak_memory_bytes'] / 2 ** 20:,.0f} MiB "
                         f"({r['peak_memory_what']})")
    if results["sample"]:
        r = results["sample"]
        lines += ["", f"sampling: greedy, batch 1, prompt {r['prompt_tokens']} token(s), "
                  f"{r['dtype']}, not compiled; best of {r['repeats']} run(s) each way",
                  f"{'':<14}{'new tokens':>11}{'cached tok/s':>14}{'uncached tok/s':>16}"
                  f"{'speed-up':>10}  same tokens"]
        for name, label in (("within_block", "within block"), ("requested", "requested")):
            row = r[name]
            lines.append(f"{label:<14}{row['new_tokens']:>11}{row['cached_tokens_per_s']:>14.1f}"
                         f"{row['uncached_tokens_per_s']:>16.1f}{row['speedup']:>9.1f}x  "
                         + ("all" if row["identical"] else
                            f"the first {row['same_tokens']} (then rounding parts them)"))
    if results["sample"] and results["sample"]["inference"]:
        r, dtype = results["sample"]["inference"], results["sample"]["dtype"]
        lines += ["", f"inference cost: prefill {r['prefill_tokens']} prompt tokens, then decode "
                  f"{r['decode_tokens']} more one at a time; greedy, KV cache, {dtype}; best of "
                  f"{r['repeats']}; weights {r['weight_bytes'] / 2 ** 20:,.1f} MiB",
                  f"{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/token':>10}"
                  f"{'KV cache':>12}"]
        for row in r["rows"]:
            lines.append(f"{row['batch']:>6}{row['prefill_tokens_per_s']:>15,.0f}"
                         f"{row['decode_tokens_per_s']:>14,.1f}{row['ms_per_token']:>10.2f}"
                         f"{row['kv_cache_bytes'] / 2 ** 20:>8,.2f} MiB")
    if results["serve"]:
        r = results["serve"]
        lines += ["", f"serving: {r['requests']} requests waiting at once, {r['prompt_tokens']:,} "
                  f"prompt and {r['new_tokens']:,} new tokens; greedy, {r['dtype']}, not compiled",
                  f"{'':<16}{'slots':>6}{'tokens/s':>10}{'first token ms':>18}"
                  f"{'ms per token':>16}{'KV cache':>12}",
                  f"{'':<16}{'':>6}{'':>10}{'median    p90':>18}{'median   p90':>16}"]
        for row in r["rows"]:
            (ttft, ttft90), (tpot, tpot90) = row["ttft_s"], row["tpot_s"]
            lines.append(f"{row['way']:<16}{row['slots']:>6}{row['tokens_per_s']:>10,.1f}"
                         f"{ttft * 1000:>10,.0f}{ttft90 * 1000:>8,.0f}{tpot * 1000:>9,.1f}"
                         f"{tpot90 * 1000:>7,.1f}{row['kv_cache_bytes'] / 2 ** 20:>8,.1f} MiB")
    if results.get("paged"):
        lines += paged_table(results["paged"])
    return "\n".join(lines)


def paged_table(r):
    """The paged engine's workloads (tools/bench/serve_speed.py), a table each."""
    lines = []
    for name, w in r["workloads"].items():
        lines += ["", f"{name}: {w['requests']} requests waiting at once, {w['prompt_tokens']:,} "
                  f"prompt tokens; {r['slots']} slots' KV memory, pages of {r['page_size']}, "
                  f"chunks of {r['prefill_chunk']}; greedy, float32; median of {r['repeats']}",
                  f"{'':<16}{'tok/s':>8}{'TTFT ms':>16}{'short TTFT':>12}{'ms/token':>14}"
                  f"{'KV MiB':>14}{'rows':>6}{'prefill':>9}{'pre-':>6}",
                  f"{'':<16}{'':>8}{'p50    p90':>16}{'p90 ms':>12}{'p50   p90':>14}"
                  f"{'held   used':>14}{'peak':>6}{'tokens':>9}{'empted':>7}"]
        for row in w["rows"]:
            (t50, t90), (_, s90), (p50, p90) = row["ttft_s"], row["short_ttft_s"], row["tpot_s"]
            lines.append(f"{row['way']:<16}{row['tokens_per_s']:>8,.1f}{t50 * 1e3:>9,.0f}"
                         f"{t90 * 1e3:>7,.0f}{s90 * 1e3:>12,.0f}{p50 * 1e3:>8,.1f}"
                         f"{p90 * 1e3:>6,.1f}{row['kv_reserved_bytes'] / 2 ** 20:>7,.1f}"
                         f"{row['kv_used_bytes'] / 2 ** 20:>7,.1f}{row['peak_rows']:>6,.0f}"
                         f"{row['prefill_tokens']:>9,.0f}{row['preemptions']:>6,.0f}")
    return lines
