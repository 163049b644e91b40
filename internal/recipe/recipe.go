// Package recipe reads the recipes of the project's Markdown docs, so that tests run a doc's own
// text instead of a copy of it.
//
// A recipe is a sequence of fenced code blocks, each announced by an HTML comment on the line
// before it (invisible when the Markdown is rendered):
//
//	<!-- recipe pull-secret file=overlays/vanilla/pull-secret/kustomization.yaml -->
//	```yaml
//	...the file's content...
//	```
//	<!-- recipe pull-secret -->
//	```sh
//	kubectl kustomize overlays/vanilla
//	```
//
// A block with file= is a file the recipe writes (relative to its working directory); a block
// without it is a shell script. Blocks of one name form one recipe, in the order of the doc.
package recipe

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Step is one code block of a recipe.
type Step struct {
	File    string // the path it is written to; empty for a script
	Content string
	Line    int // the line of the doc where the block starts, for error messages
}

// Recipe is the steps of one name.
type Recipe struct {
	Name  string
	Doc   string
	Steps []Step
}

const marker = "<!-- recipe "

// Parse returns the recipes of a Markdown document, in the order their names first appear. doc
// names the document in errors.
func Parse(doc string, md []byte) ([]Recipe, error) {
	var (
		out     []Recipe
		index   = map[string]int{}
		pending *Step
		name    string
		inBlock bool
		fence   string
		body    strings.Builder
	)
	sc := bufio.NewScanner(bytes.NewReader(md))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		switch {
		case inBlock:
			if trimmed == fence {
				inBlock = false
				if pending != nil {
					pending.Content = body.String()
					if pending.File != "" && strings.Contains(pending.Content, eof) {
						return nil, fmt.Errorf("%s:%d: a recipe file may not contain %s", doc, pending.Line, eof)
					}
					i, ok := index[name]
					if !ok {
						i = len(out)
						index[name] = i
						out = append(out, Recipe{Name: name, Doc: doc})
					}
					out[i].Steps = append(out[i].Steps, *pending)
					pending = nil
				}
				continue
			}
			if pending != nil {
				body.WriteString(line + "\n")
			}
		case strings.HasPrefix(trimmed, "```"):
			inBlock = true
			fence = trimmed[:strings.LastIndex(trimmed, "`")+1]
			body.Reset()
			if pending != nil {
				pending.Line = n
			}
		case strings.HasPrefix(trimmed, marker):
			if pending != nil {
				return nil, fmt.Errorf("%s:%d: recipe marker not followed by a code block", doc, pending.Line)
			}
			s, err := parseMarker(trimmed)
			if err != nil {
				return nil, fmt.Errorf("%s:%d: %w", doc, n, err)
			}
			name, pending = s.name, &Step{File: s.file, Line: n}
		case pending != nil && trimmed != "":
			return nil, fmt.Errorf("%s:%d: recipe marker not followed by a code block", doc, pending.Line)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", doc, err)
	}
	if inBlock {
		return nil, fmt.Errorf("%s: unterminated code block", doc)
	}
	if pending != nil {
		return nil, fmt.Errorf("%s:%d: recipe marker not followed by a code block", doc, pending.Line)
	}
	return out, nil
}

type markerFields struct{ name, file string }

func parseMarker(s string) (markerFields, error) {
	s = strings.TrimPrefix(s, marker)
	s, ok := strings.CutSuffix(s, "-->")
	if !ok {
		return markerFields{}, fmt.Errorf("recipe marker %q: want <!-- recipe NAME [file=PATH] -->", s)
	}
	fields := strings.Fields(s)
	if len(fields) == 0 || strings.Contains(fields[0], "=") {
		return markerFields{}, fmt.Errorf("recipe marker without a name")
	}
	m := markerFields{name: fields[0]}
	for _, f := range fields[1:] {
		k, v, _ := strings.Cut(f, "=")
		switch {
		case k == "file" && v != "" && !filepath.IsAbs(v) && !strings.HasPrefix(filepath.Clean(v), "..") &&
			!strings.ContainsAny(v, "'\\"):
			m.file = filepath.Clean(v)
		default:
			return markerFields{}, fmt.Errorf("recipe %s: unknown or invalid field %q (want file=RELATIVE/PATH)", m.name, f)
		}
	}
	return m, nil
}

// ParseFile is Parse of a file.
func ParseFile(path string) ([]Recipe, error) {
	md, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Parse(filepath.Base(path), md)
}

// Find returns the recipe of that name or an error naming the doc.
func Find(recipes []Recipe, name string) (Recipe, error) {
	for _, r := range recipes {
		if r.Name == name {
			return r, nil
		}
	}
	var names []string
	for _, r := range recipes {
		names = append(names, r.Name)
	}
	return Recipe{}, fmt.Errorf("no recipe %q (have %v)", name, names)
}

// Script is the recipe as one shell script, its steps in the doc's order: a file step becomes a
// here-document that writes the file, so a later step sees it and an earlier one does not. Each
// step is marked with its doc line, so a failure points at the doc.
func (r Recipe) Script() string {
	var sh strings.Builder
	for _, s := range r.Steps {
		fmt.Fprintf(&sh, "# %s:%d\n", r.Doc, s.Line)
		if s.File == "" {
			sh.WriteString(s.Content)
			continue
		}
		fmt.Fprintf(&sh, "mkdir -p '%s'\ncat > '%s' <<'%s'\n%s%s\n", filepath.Dir(s.File), s.File, eof, s.Content, eof)
	}
	return sh.String()
}

// eof ends the here-documents of file steps; Parse refuses a file step that holds it.
const eof = "RECIPE_FILE_END"
