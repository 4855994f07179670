#!/usr/bin/env python3
"""Checks a passkey report's JSON (`dilatron eval --json`) against the table printed for the same
evaluation: the JSON must parse with the standard library, add up, and give back every printed row.

Usage: passkey_json_check.py REPORT.json PRINTED.txt [CHECKPOINT STEP]
"""
import json
import sys


def fail(msg):
    print("passkey_json_check:", msg)
    sys.exit(1)


def row(length, label, a):
    # format_passkey_report's "%-8lld %-18s %8lld %8.1f%% %9.1f%%"
    return f"{length:<8} {label:<18} {a['samples']:>8} {100 * a['accuracy']:>8.1f}% {100 * a['digit_accuracy']:>9.1f}%"


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        report = json.load(f)
    with open(sys.argv[2], encoding="utf-8") as f:
        printed = [line for line in f.read().splitlines() if line[:1].isdigit() or line.startswith("attention at")]
    if len(sys.argv) > 3 and report["checkpoint"] != sys.argv[3]:
        fail(f"checkpoint {report['checkpoint']!r}, expected {sys.argv[3]!r}")
    if len(sys.argv) > 4 and report["step"] != int(sys.argv[4]):
        fail(f"step {report['step']}, expected {sys.argv[4]}")

    rows, residue_rows, attention = [], [], []
    for entry in report["lengths"]:
        n, m = entry["length"], entry["residue_modulus"]
        for b in entry["by_distance"]:
            rows.append(row(n, f"[{b['lo']}, {b['hi']})", b))
        rows.append(row(n, "all", entry))
        if sum(b["samples"] for b in entry["by_distance"]) != entry["samples"]:
            fail(f"length {n}: distance buckets do not add up to {entry['samples']} samples")
        residues = entry["by_residue"]
        if [r["residue"] for r in residues] != list(range(m)):
            fail(f"length {n}: residues {[r['residue'] for r in residues]}, expected 0..{m - 1}")
        if sum(r["samples"] for r in residues) != entry["samples"]:
            fail(f"length {n}: residues do not add up to {entry['samples']} samples")
        if entry["aligned"]["samples"] != residues[0]["samples"] or \
                entry["aligned"]["samples"] + entry["unaligned"]["samples"] != entry["samples"]:
            fail(f"length {n}: aligned + unaligned is not every sample")
        if m > 1:
            residue_rows += [row(n, "aligned", entry["aligned"]), row(n, "unaligned", entry["unaligned"])]
            residue_rows += [row(n, str(r["residue"]), r) for r in residues if r["samples"] > 0]
        attention.append(f"attention at length {n}: {entry['visited_pairs_per_token']:.2f} visited (query, key) "
                         "pairs per token per head (sum over layers)")
    if report["lengths"] and report["visited_pairs_per_token"] != report["lengths"][-1]["visited_pairs_per_token"]:
        fail("the top-level visited_pairs_per_token is not the longest length's")
    expected = rows + residue_rows + attention
    if printed != expected:
        fail("printed rows differ from the JSON:\n  printed:  " + "\n            ".join(printed) +
             "\n  from JSON: " + "\n             ".join(expected))
    print(f"ok: {len(expected)} rows")


if __name__ == "__main__":
    main()
