// Package imagelist parses the instance's image list: plain text, one image
// reference per line.
//
// Rules:
//   - Surrounding white space is trimmed and a trailing "\r" (CRLF files) is
//     dropped; a UTF-8 byte order mark at the start of the file is ignored.
//   - Blank lines and lines whose first non-space character is '#' are ignored.
//   - A trailing comment is allowed when '#' follows white space
//     ("busybox:1.36  # shell for debugging"). A reference can hold neither white
//     space nor '#', so this cannot cut a valid reference; "busybox#x" stays one
//     (malformed) token and is reported.
//   - References are parsed with github.com/distribution/reference and
//     normalized: "busybox" becomes "docker.io/library/busybox:latest". Two lines
//     that normalize to the same reference are one entry; the first wins and the
//     later ones are listed in Duplicates.
//   - Digests ("name@sha256:...") and "name:tag@sha256:..." are kept whole: the
//     normalized string is what goes to CRI, a tag is never rebuilt from parts.
//   - A malformed line is a LineError for that line only; every other line is
//     still parsed.
//
// The list's Digest identifies what the list means, not how it is written: see
// List.Digest.
package imagelist

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/distribution/reference"
)

// Entry is one image to prefetch.
type Entry struct {
	Line int    // 1-based line number in the source
	Text string // the line as written, trimmed (comment included)
	Ref  string // the normalized, fully qualified reference sent to CRI
}

// Duplicate is a line whose reference normalizes to an earlier entry's.
type Duplicate struct {
	Entry
	FirstLine int // the line of the entry it repeats
}

// LineError is a line that could not be parsed.
type LineError struct {
	Source string // file name (or other label) given to Parse
	Line   int
	Text   string // the trimmed line
	Err    error
}

// MaxShown bounds how many bytes of a bad line (and of the parser's error
// about it, which repeats the line) logs, events and error messages show: a
// garbage list must not turn into a garbage log.
const MaxShown = 256

func (e *LineError) Error() string {
	return fmt.Sprintf("%s:%d: parse %q: %s", e.Source, e.Line, Shorten(e.Text), Shorten(fmt.Sprint(e.Err)))
}

// ShortText is the line as logs and events show it: at most MaxShown bytes.
func (e *LineError) ShortText() string { return Shorten(e.Text) }

// Shorten cuts s to at most MaxShown bytes (on a UTF-8 boundary) and marks
// the cut with "...".
func Shorten(s string) string {
	if len(s) <= MaxShown {
		return s
	}
	return strings.ToValidUTF8(s[:MaxShown], "") + fmt.Sprintf("...(%d bytes)", len(s))
}

func (e *LineError) Unwrap() error { return e.Err }

// List is a parsed image list.
type List struct {
	Entries    []Entry // unique references, in file order
	Duplicates []Duplicate
	Errors     []LineError
	// Digest is the hex SHA-256 of the list's meaning: the sorted, normalized
	// references followed by the sorted text of the malformed lines (without
	// their trailing comments). Reordering
	// lines, editing comments or blank lines, or writing a reference in another
	// equivalent form ("busybox" for "docker.io/library/busybox:latest") keeps it;
	// adding, removing or changing an image changes it. Malformed lines count so
	// that fixing one (which changes the node's outcome from failed to perhaps
	// succeeded) gives a new digest even when the fix only removes the line.
	Digest string
}

// ParseFile reads and parses the list at path. The error is for I/O only
// (missing file, a directory in its place, no permission) and names the path;
// malformed lines are in List.Errors.
func ParseFile(path string) (*List, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read image list: %w", err)
	}
	return Parse(bytes.NewReader(data), path), nil
}

// Parse parses a list read from r; source names it in errors. It never fails
// as a whole: a malformed line, or a read error (reported at the line where it
// happened), is a LineError.
func Parse(r io.Reader, source string) *List {
	l := &List{}
	first := map[string]int{} // normalized ref -> line of first entry
	br := bufio.NewReader(r)
	for n := 1; ; n++ {
		raw, err := br.ReadString('\n')
		if raw != "" {
			if n == 1 {
				raw = strings.TrimPrefix(raw, "\ufeff")
			}
			l.parseLine(source, n, raw, first)
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				l.Errors = append(l.Errors, LineError{Source: source, Line: n, Err: fmt.Errorf("read: %w", err)})
			}
			break
		}
	}
	l.Digest = l.digest()
	return l
}

func (l *List) parseLine(source string, n int, raw string, first map[string]int) {
	text := strings.TrimSpace(raw)
	token := stripComment(text)
	if token == "" {
		return
	}
	ref, err := Normalize(token)
	if err != nil {
		l.Errors = append(l.Errors, LineError{Source: source, Line: n, Text: text, Err: err})
		return
	}
	e := Entry{Line: n, Text: text, Ref: ref}
	if line, ok := first[ref]; ok {
		l.Duplicates = append(l.Duplicates, Duplicate{Entry: e, FirstLine: line})
		return
	}
	first[ref] = n
	l.Entries = append(l.Entries, e)
}

// stripComment returns the reference part of a trimmed line: "" for a comment
// line, the text before a " #" or "\t#" comment otherwise.
func stripComment(text string) string {
	if strings.HasPrefix(text, "#") {
		return ""
	}
	if i := strings.IndexFunc(text, isSpace); i >= 0 {
		rest := strings.TrimLeftFunc(text[i:], isSpace)
		if strings.HasPrefix(rest, "#") {
			return text[:i]
		}
	}
	return text
}

func isSpace(r rune) bool { return r == ' ' || r == '\t' }

// Normalize parses one reference and returns its fully qualified form, with
// ":latest" added only when neither a tag nor a digest is given.
func Normalize(s string) (string, error) {
	named, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		return "", err
	}
	return reference.TagNameOnly(named).String(), nil
}

func (l *List) digest() string {
	refs := make([]string, 0, len(l.Entries))
	for _, e := range l.Entries {
		refs = append(refs, e.Ref)
	}
	bad := make([]string, 0, len(l.Errors))
	for _, e := range l.Errors {
		bad = append(bad, stripComment(e.Text))
	}
	slices.Sort(refs)
	slices.Sort(bad)
	h := sha256.New()
	// Kind prefixes and lengths keep the encoding unambiguous whatever bytes a
	// malformed line holds.
	for _, r := range refs {
		fmt.Fprintf(h, "image %d %s\n", len(r), r)
	}
	for _, b := range bad {
		fmt.Fprintf(h, "error %d %s\n", len(b), b)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Refs returns the references of the entries, in order.
func (l *List) Refs() []string {
	out := make([]string, len(l.Entries))
	for i, e := range l.Entries {
		out[i] = e.Ref
	}
	return out
}
