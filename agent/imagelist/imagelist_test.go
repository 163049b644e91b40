package imagelist

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/distribution/reference"
)

const dig = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestParse(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		in     string
		refs   []string
		lines  []int // line of each entry
		dups   []int // lines reported as duplicates
		errs   []int // lines reported as errors
		errMsg string
	}{
		{name: "empty", in: ""},
		{name: "only comments and blanks", in: "# a\n\n   \n\t# b\n"},
		{
			name:  "normalization",
			in:    "busybox\nquay.io/prometheus/node-exporter:v1.8.2\nlocalhost:5000/a/b:c\n",
			refs:  []string{"docker.io/library/busybox:latest", "quay.io/prometheus/node-exporter:v1.8.2", "localhost:5000/a/b:c"},
			lines: []int{1, 2, 3},
		},
		{
			name:  "trimming, CRLF and no final newline",
			in:    "  busybox:1.36  \r\n\r\n\tnginx\r\nalpine",
			refs:  []string{"docker.io/library/busybox:1.36", "docker.io/library/nginx:latest", "docker.io/library/alpine:latest"},
			lines: []int{1, 3, 4},
		},
		{
			name:  "byte order mark",
			in:    "\ufeffbusybox\n",
			refs:  []string{"docker.io/library/busybox:latest"},
			lines: []int{1},
		},
		{
			name:  "trailing comments",
			in:    "busybox # shell\nnginx\t#web\n",
			refs:  []string{"docker.io/library/busybox:latest", "docker.io/library/nginx:latest"},
			lines: []int{1, 2},
		},
		{
			name:  "digests are kept whole",
			in:    "busybox@" + dig + "\nregistry.example.com:5000/x/y:1.0@" + dig + "\n",
			refs:  []string{"docker.io/library/busybox@" + dig, "registry.example.com:5000/x/y:1.0@" + dig},
			lines: []int{1, 2},
		},
		{
			name:  "duplicates after normalization, first wins",
			in:    "busybox\ndocker.io/library/busybox:latest\nlibrary/busybox\nbusybox:latest\nbusybox:1.36\n",
			refs:  []string{"docker.io/library/busybox:latest", "docker.io/library/busybox:1.36"},
			lines: []int{1, 5},
			dups:  []int{2, 3, 4},
		},
		{
			name:   "malformed lines are errors for that line only",
			in:     "busybox\nFoo:bar\nnginx\nbusybox#x\nbad tag here\nalpine:\n",
			refs:   []string{"docker.io/library/busybox:latest", "docker.io/library/nginx:latest"},
			lines:  []int{1, 3},
			errs:   []int{2, 4, 5, 6},
			errMsg: `images.txt:2: parse "Foo:bar": `,
		},
		{
			name:  "digest that is too short",
			in:    "busybox@sha256:abc\n",
			errs:  []int{1},
			lines: nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := Parse(strings.NewReader(tt.in), "images.txt")
			if got := l.Refs(); !slices.Equal(got, tt.refs) && len(got)+len(tt.refs) > 0 {
				t.Errorf("refs = %q, want %q", got, tt.refs)
			}
			var lines, dups, errs []int
			for _, e := range l.Entries {
				lines = append(lines, e.Line)
			}
			for _, d := range l.Duplicates {
				dups = append(dups, d.Line)
				if d.FirstLine != 1 {
					t.Errorf("duplicate on line %d points at line %d, want 1", d.Line, d.FirstLine)
				}
			}
			for _, e := range l.Errors {
				errs = append(errs, e.Line)
			}
			if !slices.Equal(lines, tt.lines) {
				t.Errorf("entry lines = %v, want %v", lines, tt.lines)
			}
			if !slices.Equal(dups, tt.dups) {
				t.Errorf("duplicate lines = %v, want %v", dups, tt.dups)
			}
			if !slices.Equal(errs, tt.errs) {
				t.Errorf("error lines = %v, want %v (errors: %v)", errs, tt.errs, l.Errors)
			}
			if tt.errMsg != "" && !strings.HasPrefix(l.Errors[0].Error(), tt.errMsg) {
				t.Errorf("error = %q, want prefix %q", l.Errors[0].Error(), tt.errMsg)
			}
			if len(l.Digest) != 64 {
				t.Errorf("digest %q is not hex sha256", l.Digest)
			}
		})
	}
}

func TestLineErrorUnwrap(t *testing.T) {
	t.Parallel()
	l := Parse(strings.NewReader("busybox:bad^tag\n"), "list")
	if len(l.Errors) != 1 {
		t.Fatalf("errors = %v", l.Errors)
	}
	var err error = &l.Errors[0]
	if !errors.Is(err, reference.ErrReferenceInvalidFormat) {
		t.Errorf("%v does not unwrap to ErrReferenceInvalidFormat", err)
	}
	if l.Errors[0].Text != "busybox:bad^tag" || l.Errors[0].Source != "list" {
		t.Errorf("error fields = %+v", l.Errors[0])
	}
}

func TestDigest(t *testing.T) {
	t.Parallel()
	d := func(s string) string { return Parse(strings.NewReader(s), "x").Digest }
	base := d("busybox\nnginx:1.27\n")
	same := map[string]string{
		"reordered":          "nginx:1.27\nbusybox\n",
		"other spelling":     "docker.io/library/busybox:latest\ndocker.io/library/nginx:1.27\n",
		"comments and blank": "# hello\n\nbusybox   # sh\n\r\nnginx:1.27\r\n",
		"duplicate":          "busybox\nnginx:1.27\nbusybox:latest\n",
	}
	for name, in := range same {
		if got := d(in); got != base {
			t.Errorf("%s: digest changed", name)
		}
	}
	differ := map[string]string{
		"image added":     "busybox\nnginx:1.27\nalpine\n",
		"image removed":   "busybox\n",
		"tag changed":     "busybox\nnginx:1.28\n",
		"bad line added":  "busybox\nnginx:1.27\nNOPE\n",
		"empty":           "",
		"digest instead":  "busybox@" + dig + "\nnginx:1.27\n",
		"bad line joined": "busybox nginx:1.27\n",
	}
	seen := map[string]string{base: "base"}
	for name, in := range differ {
		got := d(in)
		if other, ok := seen[got]; ok {
			t.Errorf("%s: digest equals that of %s", name, other)
		}
		seen[got] = name
	}
	// Fixing a bad line changes the digest, and the fixed list equals the one
	// written correctly from the start.
	bad, fixed := d("busybox\nNginx:1.27\n"), d("busybox\nnginx:1.27\n")
	if bad == fixed || fixed != base {
		t.Errorf("fixing a bad line: bad=%s fixed=%s base=%s", bad, fixed, base)
	}
}

func TestParseFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "images.txt")
	if err := os.WriteFile(path, []byte("busybox\nBAD\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := ParseFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Entries) != 1 || len(l.Errors) != 1 {
		t.Fatalf("list = %+v", l)
	}
	if want := path + ":2: "; !strings.HasPrefix(l.Errors[0].Error(), want) {
		t.Errorf("error %q does not start with %q", l.Errors[0].Error(), want)
	}
	if _, err := ParseFile(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("missing file: no error")
	}
}

type failingReader struct{ data string }

func (r *failingReader) Read(p []byte) (int, error) {
	if r.data == "" {
		return 0, errors.New("disk on fire")
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

func TestParseReadError(t *testing.T) {
	t.Parallel()
	l := Parse(&failingReader{data: "busybox\nnginx\n"}, "cm")
	if len(l.Entries) != 2 || len(l.Errors) != 1 || l.Errors[0].Line != 3 {
		t.Fatalf("list = %+v", l)
	}
	if !strings.Contains(l.Errors[0].Error(), "disk on fire") {
		t.Errorf("error = %v", l.Errors[0].Error())
	}
}

func TestLongLineErrorIsBounded(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("A", 10000)
	l := Parse(strings.NewReader(long+"\n"), "x")
	if len(l.Errors) != 1 {
		t.Fatalf("errors = %v", l.Errors)
	}
	if n := len(l.Errors[0].Error()); n > 600 {
		t.Errorf("error message is %d bytes long", n)
	}
}

func TestParseFileErrorsNameThePathOnce(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	for name, path := range map[string]string{
		"missing":   filepath.Join(dir, "missing.txt"),
		"directory": dir,
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ParseFile(path)
			if err == nil {
				t.Fatal("no error")
			}
			msg := err.Error()
			if !strings.Contains(msg, path) || strings.Count(msg, "read image list") != 1 {
				t.Errorf("error %q: want the path named and one \"read image list\" prefix", msg)
			}
		})
	}
}

func TestHugeBadLineIsShownShort(t *testing.T) {
	t.Parallel()
	huge := strings.Repeat("Ab!", 40000) // 120 KB of garbage on one line
	l := Parse(strings.NewReader("busybox\n"+huge+"\n"), "list.txt")
	if len(l.Errors) != 1 {
		t.Fatalf("%d errors, want 1", len(l.Errors))
	}
	le := l.Errors[0]
	if n := len(le.ShortText()); n > MaxShown+32 {
		t.Errorf("ShortText is %d bytes, want at most about %d", n, MaxShown)
	}
	if n := len(le.Error()); n > 3*MaxShown {
		t.Errorf("Error() is %d bytes for a %d-byte line, want it bounded", n, len(huge))
	}
	if !strings.Contains(le.ShortText(), "120000 bytes") {
		t.Errorf("ShortText %q does not say how long the line was", le.ShortText())
	}
}
