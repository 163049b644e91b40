package imagelist

import (
	"strings"
	"testing"
)

func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		"",
		"busybox\n",
		"# comment\n\n  busybox:1.36  # sh\r\nnginx\n",
		"busybox\ndocker.io/library/busybox:latest\n",
		"Foo:bar\nbusybox@sha256:abc\n",
		"localhost:5000/a/b:c@" + dig + "\n",
		"\ufeffquay.io/x/y\n\t#\n#\nbusybox#x\n",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in string) {
		l := Parse(strings.NewReader(in), "fuzz")
		if again := Parse(strings.NewReader(in), "fuzz"); again.Digest != l.Digest {
			t.Fatalf("digest not deterministic: %s vs %s", l.Digest, again.Digest)
		}
		// Every line with content is exactly one of entry, duplicate, error.
		content := 0
		for i, line := range strings.Split(in, "\n") {
			if i == 0 {
				line = strings.TrimPrefix(line, "\ufeff")
			}
			if stripComment(strings.TrimSpace(line)) != "" {
				content++
			}
		}
		if got := len(l.Entries) + len(l.Duplicates) + len(l.Errors); got != content {
			t.Fatalf("%d lines with content, but %d entries + %d duplicates + %d errors",
				content, len(l.Entries), len(l.Duplicates), len(l.Errors))
		}
		seen := map[string]bool{}
		for _, e := range l.Entries {
			if seen[e.Ref] {
				t.Fatalf("entry %q listed twice", e.Ref)
			}
			seen[e.Ref] = true
			// Normalization is idempotent: the reference sent to CRI parses to itself.
			if again, err := Normalize(e.Ref); err != nil || again != e.Ref {
				t.Fatalf("Normalize(%q) = %q, %v", e.Ref, again, err)
			}
		}
		for _, d := range l.Duplicates {
			if !seen[d.Ref] || d.FirstLine >= d.Line {
				t.Fatalf("duplicate %+v does not follow its entry", d)
			}
		}
		for _, e := range l.Errors {
			if e.Err == nil || e.Line < 1 {
				t.Fatalf("bad LineError %+v", e)
			}
			_ = e.Error()
		}
	})
}
