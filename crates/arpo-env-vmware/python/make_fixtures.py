"""Makes the fixture files of arpo-env-vmware's OSWorld tests and records what OSWorld's own
functions (desktop-env 1.0.2) say about them. Run from the repository root with the worker's
virtualenv:

    PYTHONPATH=crates/arpo-env-vmware/tests/support/pystub \
      .venv-osworld/bin/python crates/arpo-env-vmware/python/make_fixtures.py

Writes under crates/arpo-env-vmware/tests/fixtures/:
  osworld_eval/<domain>/...      result files (correct and wrong) and gold files, one task a domain
  (--native-only: only native_metrics/, leaving the binary task fixtures untouched)
  osworld_eval/record.json       per domain: the task file, which guest path / cloud file / command
                                 output each case serves, and the score OSWorld's metric gives when
                                 called directly on the same files
  native_metrics/record.json     inputs and OSWorld's output for every metric arpo-env-vmware has
                                 natively (the Rust goldens)
"""

import json
import os
import shutil
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

import docx  # python-docx
import openpyxl
import pptx  # python-pptx
from PIL import Image, ImageDraw

from desktop_env.evaluators import metrics

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures")
# --native-only leaves the task fixtures (binary files with timestamps) as they are.
NATIVE_ONLY = "--native-only" in sys.argv
EVAL = tempfile.mkdtemp() if NATIVE_ONLY else os.path.join(OUT, "osworld_eval")


def path(*parts):
    p = os.path.join(EVAL, *parts)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p


def xlsx(p, value):
    wb = openpyxl.Workbook()
    wb.active.title = "Sheet1"
    wb.active["A1"] = "ignored"
    ws = wb.create_sheet("Sheet2")
    for r, row in enumerate([["Year", "Net income"], [2021, 100], [2022, value]], start=1):
        for c, v in enumerate(row, start=1):
            ws.cell(row=r, column=c, value=v)
    wb.save(p)


def pptx_file(p, title):
    prs = pptx.Presentation()
    slide = prs.slides.add_slide(prs.slide_layouts[1])
    slide.shapes.title.text = title
    slide.placeholders[1].text = "Training starts in spring"
    prs.save(p)


def docx_file(p, text, font=None):
    d = docx.Document()
    para = d.add_paragraph()
    run = para.add_run(text)
    if font:
        run.font.name = font
    d.save(p)


def image(p, shapes):
    img = Image.new("RGB", (160, 120), (240, 240, 240))
    draw = ImageDraw.Draw(img)
    for kind, box, colour in shapes:
        (draw.rectangle if kind == "rect" else draw.ellipse)(box, fill=colour)
    img.save(p)


GOOD_SHAPES = [("rect", (10, 10, 70, 60), (200, 30, 30)), ("ellipse", (80, 40, 150, 110), (30, 30, 200))]
BAD_SHAPES = [("ellipse", (5, 50, 60, 115), (20, 160, 20)), ("rect", (90, 5, 155, 45), (0, 0, 0))]

# One task a domain: (domain, task file under examples/, cases). A case: what the guest serves
# (guest path -> fixture file), cloud files (dest -> fixture file), /execute outputs, and the
# direct call of OSWorld's metric on the same inputs (func, result, expected, options).
tasks = []


def case(files=None, cloud=None, outputs=None, direct=None):
    return {"files": files or {}, "cloud": cloud or {}, "outputs": outputs or {}, "direct": direct}


def rel(p):
    return os.path.relpath(p, EVAL)


# libreoffice_calc: compare_table, sheet_data of Sheet2 in both files.
gold = path("libreoffice_calc", "gold.xlsx"); xlsx(gold, 250)
good = path("libreoffice_calc", "good.xlsx"); xlsx(good, 250)
bad = path("libreoffice_calc", "bad.xlsx"); xlsx(bad, 251)
calc_rules = {"rules": [{"type": "sheet_data", "sheet_idx0": "RNSheet2", "sheet_idx1": "ENSheet2"}]}
tasks.append(("libreoffice_calc", "libreoffice_calc/42e0a640-4f19-4b28-973d-729602b5a4a7.json", {
    which: case(files={"/home/user/NetIncome.xlsx": rel(f)}, cloud={"2_NetIncome_gt1.xlsx": rel(gold)},
                direct=("compare_table", f, gold, calc_rules))
    for which, f in (("correct", good), ("wrong", bad))}))

# libreoffice_impress: compare_pptx_files.
gold = path("libreoffice_impress", "gold.pptx"); pptx_file(gold, "New Club Spring 2018 Training")
good = path("libreoffice_impress", "good.pptx"); pptx_file(good, "New Club Spring 2018 Training")
bad = path("libreoffice_impress", "bad.pptx"); pptx_file(bad, "New Club Spring 2019 Training")
tasks.append(("libreoffice_impress", "libreoffice_impress/550ce7e7-747b-495f-b122-acdc4d0b8e54.json", {
    which: case(files={"/home/user/Desktop/New_Club_Spring_2018_Training.pptx": rel(f)},
                cloud={"New_Club_Spring_2018_Training_Gold.pptx": rel(gold)},
                direct=("compare_pptx_files", f, gold, {}))
    for which, f in (("correct", good), ("wrong", bad))}))

# libreoffice_writer: compare_font_names against a rule.
good = path("libreoffice_writer", "good.docx"); docx_file(good, "Dublin Zoo", "Times New Roman")
bad = path("libreoffice_writer", "bad.docx"); docx_file(bad, "Dublin Zoo", "Arial")
writer_rule = {"font_name": "Times New Roman"}
tasks.append(("libreoffice_writer", "libreoffice_writer/0e763496-b6bb-4508-a427-fad0b6c3e195.json", {
    which: case(files={"/home/user/Desktop/Dublin_Zoo_Intro.docx": rel(f)},
                direct=("compare_font_names", f, writer_rule, {}))
    for which, f in (("correct", good), ("wrong", bad))}))

# multi_apps: compare_docx_files with ignore_blanks.
gold = path("multi_apps", "gold.docx"); docx_file(gold, "Meeting notes: ship on Friday.")
good = path("multi_apps", "good.docx"); docx_file(good, "Meeting  notes: ship on Friday. ")
bad = path("multi_apps", "bad.docx"); docx_file(bad, "Meeting notes: ship on Monday.")
tasks.append(("multi_apps", "multi_apps/51f5801c-18b3-4f25-b0c3-02f85507a078.json", {
    which: case(files={"/home/user/Desktop/notes.docx": rel(f)}, cloud={"notes_gold.docx": rel(gold)},
                direct=("compare_docx_files", f, gold, {"ignore_blanks": True}))
    for which, f in (("correct", good), ("wrong", bad))}))

# gimp: check_file_exists_and_structure_sim (the export against the original, both from the VM).
orig = path("gimp", "original.jpg"); image(orig, GOOD_SHAPES)
good = path("gimp", "good.jpg"); image(good, GOOD_SHAPES)
bad = path("gimp", "bad.jpg"); image(bad, BAD_SHAPES)
tasks.append(("gimp", "gimp/77b8ab4d-994f-43ac-8930-8ca087d7c4b4.json", {
    which: case(files={"/home/user/Desktop/export.jpg": rel(f),
                       "/home/user/Desktop/The_Lost_River_Of_Dreams.jpg": rel(orig)},
                direct=("check_file_exists_and_structure_sim", f, orig, {}))
    for which, f in (("correct", good), ("wrong", bad))}))

# vlc: compare_images (a snapshot against the gold frame).
gold = path("vlc", "gold.png"); image(gold, GOOD_SHAPES)
good = path("vlc", "good.png"); image(good, GOOD_SHAPES)
bad = path("vlc", "bad.png"); image(bad, BAD_SHAPES)
tasks.append(("vlc", "vlc/fba2c100-79e8-42df-ae74-b592418d54f4.json", {
    which: case(files={"/home/user/Desktop/interstellar.png": rel(f)}, cloud={"interstellar_gold.png": rel(gold)},
                direct=("compare_images", f, gold, {}))
    for which, f in (("correct", good), ("wrong", bad))}))

# thunderbird: check_thunderbird_prefs on prefs.js.
good = path("thunderbird", "good_prefs.js")
open(good, "w").write('user_pref("mail.identity.id1.htmlSigText", "Anonym\\nXYZ Lab");\n'
                      'user_pref("mail.identity.id1.fullName", "Anonym");\n')
bad = path("thunderbird", "bad_prefs.js")
open(bad, "w").write('user_pref("mail.identity.id1.htmlSigText", "Best regards");\n')
tb_rule = {"expect": {"mail.identity.id1.htmlSigText": {"method": "re.S", "ref": "Anonym.+XYZ Lab"}}}
tasks.append(("thunderbird", "thunderbird/6766f2b8-8a72-417f-a9e5-56fcaa735837.json", {
    which: case(files={"/home/user/.thunderbird/t5q2a5hp.default-release/prefs.js": rel(f)},
                direct=("check_thunderbird_prefs", f, tb_rule, {}))
    for which, f in (("correct", good), ("wrong", bad))}))

# vs_code: check_json_settings on settings.json.
good = path("vs_code", "good_settings.json")
json.dump({"python.analysis.diagnosticSeverityOverrides": {"reportMissingImports": "none"}, "editor.fontSize": 14},
          open(good, "w"))
bad = path("vs_code", "bad_settings.json")
json.dump({"python.analysis.diagnosticSeverityOverrides": {"reportMissingImports": "warning"}}, open(bad, "w"))
vs_rule = {"expected": {"python.analysis.diagnosticSeverityOverrides": {"reportMissingImports": "none"}}}
tasks.append(("vs_code", "vs_code/e2b5e914-ffe1-44d2-8e92-58f8c5d92bb2.json", {
    which: case(files={"/home/user/.config/Code/User/settings.json": rel(f)},
                direct=("check_json_settings", f, vs_rule, {}))
    for which, f in (("correct", good), ("wrong", bad))}))

# os: exact_match on a vm_command_line output.
gsettings = json.dumps(["gsettings", "get", "org.gnome.desktop.session", "idle-delay"])
tasks.append(("os", "os/bedcedc4-4d72-425e-ad62-21960b11fe0d.json", {
    which: case(outputs={gsettings: out}, direct=("exact_match", out, {"expected": "uint32 0\n"}, {}))
    for which, out in (("correct", "uint32 0\n"), ("wrong", "uint32 300\n"))}))

# chrome: the enable_do_not_track getter reads Chrome's Preferences through execute_python_command
# (the platform, then $HOME's path) and /file; exact_match against "true".
prefix = "import pyautogui; import time; pyautogui.FAILSAFE = False; "
platform_cmd = json.dumps(["python", "-c", prefix + "import platform; print(platform.system())"])
prefs_path = "/home/user/.config/google-chrome/Default/Preferences"
prefs_cmd = json.dumps(["python", "-c", prefix + "import os; print(os.path.join(os.getenv('HOME'), '.config/google-chrome/Default/Preferences'))"])
good = path("chrome", "good_Preferences"); json.dump({"enable_do_not_track": True, "profile": {}}, open(good, "w"))
bad = path("chrome", "bad_Preferences"); json.dump({"profile": {}}, open(bad, "w"))
tasks.append(("chrome", "chrome/030eeff7-b492-4218-b312-701ec99ee0cc.json", {
    which: case(files={prefs_path: rel(f)}, outputs={platform_cmd: "Linux\n", prefs_cmd: prefs_path + "\n"},
                direct=("exact_match", "true" if which == "correct" else "false", {"expected": "true"}, {}))
    for which, f in (("correct", good), ("wrong", bad))}))

record = {"desktop_env": "1.0.2", "tasks": []}
for domain, task, cases in tasks:
    entry = {"domain": domain, "task": task, "cases": {}}
    for which, c in cases.items():
        func, result, expected, options = c.pop("direct")
        score = float(getattr(metrics, func)(result, expected, **options))
        c["osworld_direct"] = {"func": func, "score": score}
        entry["cases"][which] = c
    record["tasks"].append(entry)
    print(domain, {w: c["osworld_direct"]["score"] for w, c in entry["cases"].items()}, file=sys.stderr)
if not NATIVE_ONLY:
    with open(path("record.json"), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")

# Native metrics: each input through OSWorld's own function.
NATIVE = os.path.join(OUT, "native_metrics")
shutil.rmtree(NATIVE, ignore_errors=True)
os.makedirs(NATIVE)


def write(name, text):
    p = os.path.join(NATIVE, name)
    with open(p, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return name


files = {
    "a.txt": write("a.txt", "alpha\nbeta  gamma\n\tdelta\n"),
    "a_blanks.txt": write("a_blanks.txt", "alpha beta gamma delta"),
    "a_case.txt": write("a_case.txt", "ALPHA\nbeta  gamma\n\tdelta\n"),
    "b.txt": write("b.txt", "alpha\nbeta gamma\ndelta\nepsilon\n"),
    "list.txt": write("list.txt", "zip/jammy 3.0\nopenjdk-11-jre/jammy 11.0.20\nright\n"),
    "settings.json": write("settings.json", json.dumps(
        {"editor.fontSize": 14.0, "python.analysis.diagnosticSeverityOverrides": {"reportMissingImports": "none"},
         "files.autoSave": True, "editor.rulers": [80, 120]})),
    "settings_comment.json": write("settings_comment.json", '{\n  // a comment\n  "editor.fontSize": 14\n}\n'),
}
cases = []


def native(func, result, expected=None, options=None, result_file=None, expected_file=None):
    """result/expected: values; *_file: a fixture file name used in place of the value."""
    r = os.path.join(NATIVE, result_file) if result_file else result
    e = os.path.join(NATIVE, expected_file) if expected_file else expected
    fn = getattr(metrics, func)
    score = fn(r, e, **(options or {})) if e is not None else fn(r, **(options or {}))
    cases.append({"func": func, "result": result, "result_file": result_file, "expected": expected,
                  "expected_file": expected_file, "options": options or {}, "osworld": float(score)})


native("exact_match", "uint32 0\n", {"expected": "uint32 0\n"})
native("exact_match", "uint32 0", {"expected": "uint32 0\n"})
native("check_include_exclude", "languagetool installed", {"include": ["languagetool"], "exclude": ["error"]})
native("check_include_exclude", "languagetool error", {"include": ["languagetool"], "exclude": ["error"]})
native("check_include_exclude", "nothing", {"include": ["languagetool"]})
native("is_in_list", "a b c", {"expected": "b"})
native("is_in_list", "a b c", {"expected": "d"})
native("literal_match", "Hello", "hello", {"ignore_case": True})
native("literal_match", "Hello", "hello", {})
native("literal_match", ["a", "B"], ["A", "b"], {"type": "list", "ignore_case": True})
native("fuzzy_match", "kitten", {"expected": "sitting"})
native("fuzzy_match", "same", {"expected": "same"})
native("compare_text_file", None, None, {}, "a.txt", "a.txt")
native("compare_text_file", None, None, {}, "a.txt", "a_blanks.txt")
native("compare_text_file", None, None, {"ignore_blanks": True}, "a.txt", "a_blanks.txt")
native("compare_text_file", None, None, {"ignore_case": True}, "a.txt", "a_case.txt")
native("diff_text_file", None, None, {}, "a.txt", "b.txt")
native("check_list", None, {"expect": ["^right$", "zip/"], "unexpect": ["^error"]}, {}, "list.txt")
native("check_list", None, {"expect": ["^right$"], "unexpect": ["jammy"]}, {}, "list.txt")
native("check_list", None, {"expect": ["^missing$"], "unexpect": []}, {}, "list.txt")
native("check_direct_json_object", "{'a': 1, 'b': 'x'}", {"expected": {"a": 1, "b": "x"}})
native("check_direct_json_object", "{'a': 2}", {"expected": {"a": 1}})
native("check_direct_json_object", "{'a': 'hello world'}", {"expected": {"a": "world"}, "expect_in_result": True})
native("check_json_settings", None, {"expected": {"editor.fontSize": 14}}, {}, "settings.json")
native("check_json_settings", None, {"expected": {"python.analysis.diagnosticSeverityOverrides": {"reportMissingImports": "none"}, "files.autoSave": 1}}, {}, "settings.json")
native("check_json_settings", None, {"expected": {"editor.rulers": [80]}}, {}, "settings.json")
native("check_json_settings", None, {"expected": {"editor.wordWrap": "on"}}, {}, "settings.json")
native("check_json_settings", None, {"expected": {"editor.fontSize": 14}}, {}, "settings_comment.json")
native("check_json_settings", None, {"expected": {"editor.fontSize": 14}}, {}, "a.txt")
with open(os.path.join(NATIVE, "record.json"), "w") as f:
    json.dump({"desktop_env": "1.0.2", "cases": cases}, f, indent=1)
    f.write("\n")
print(f"{len(cases)} native metric cases", file=sys.stderr)
