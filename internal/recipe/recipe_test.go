package recipe

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const doc = "Intro.\n" +
	"<!-- recipe demo file=dir/a.yaml -->\n" +
	"```yaml\n" +
	"kind: A\n" +
	"```\n" +
	"Text between.\n" +
	"```sh\n" +
	"echo not a recipe\n" +
	"```\n" +
	"<!-- recipe other -->\n" +
	"```sh\n" +
	"echo other\n" +
	"```\n" +
	"<!-- recipe demo -->\n" +
	"````sh\n" +
	"cat dir/a.yaml > out.txt\n" +
	"# ```\n" +
	"echo inner fence >> out.txt\n" +
	"````\n" +
	"<!-- recipe fenced file=README.md -->\n" +
	"````markdown\n" +
	"```sh\n" +
	"````\n"

func TestParse(t *testing.T) {
	t.Parallel()
	rs, err := Parse("doc.md", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 3 || rs[0].Name != "demo" || rs[1].Name != "other" || rs[2].Name != "fenced" {
		t.Fatalf("recipes %+v, want demo, other, fenced", rs)
	}
	if got := rs[2].Steps[0].Content; got != "```sh\n" {
		t.Errorf("fenced content %q: a longer fence must hold a shorter one", got)
	}
	demo := rs[0]
	if len(demo.Steps) != 2 {
		t.Fatalf("demo has %d steps, want 2: %+v", len(demo.Steps), demo.Steps)
	}
	if s := demo.Steps[0]; s.File != "dir/a.yaml" || s.Content != "kind: A\n" || s.Line != 3 {
		t.Errorf("first step %+v", s)
	}
	if s := demo.Steps[1]; s.File != "" || !strings.Contains(s.Content, "echo inner fence") {
		t.Errorf("second step %+v", s)
	}
	if _, err := Find(rs, "missing"); err == nil || !strings.Contains(err.Error(), "demo") {
		t.Errorf("Find of a missing recipe: %v, want an error listing the recipes", err)
	}
}

// TestScript runs a recipe's script: the file step is written before the script that reads it.
func TestScript(t *testing.T) {
	t.Parallel()
	rs, err := Parse("doc.md", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cmd := exec.Command("bash", "-euo", "pipefail", "-c", rs[0].Script())
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	got, err := os.ReadFile(filepath.Join(dir, "out.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "kind: A\ninner fence\n" {
		t.Errorf("out.txt = %q", got)
	}
}

func TestParseErrors(t *testing.T) {
	t.Parallel()
	for name, md := range map[string]string{
		"marker without block":  "<!-- recipe a -->\ntext\n```sh\n```\n",
		"marker at end":         "<!-- recipe a -->\n",
		"no name":               "<!-- recipe file=x -->\n```\n```\n",
		"absolute file":         "<!-- recipe a file=/etc/x -->\n```\n```\n",
		"file outside":          "<!-- recipe a file=../x -->\n```\n```\n",
		"unknown field":         "<!-- recipe a dir=x -->\n```\n```\n",
		"unterminated block":    "<!-- recipe a -->\n```sh\necho\n",
		"unterminated marker":   "<!-- recipe a\n```\n```\n",
		"here-document end tag": "<!-- recipe a file=x -->\n```\n" + eof + "\n```\n",
	} {
		if _, err := Parse("doc.md", []byte(md)); err == nil || !strings.Contains(err.Error(), "doc.md") {
			t.Errorf("%s: error %v, want one naming the doc", name, err)
		}
	}
}
