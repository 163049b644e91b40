package fn

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/kio"
	"sigs.k8s.io/kustomize/kyaml/yaml"
)

// NewCommand returns the function's command:
//
//	image-prefetcher-fn [--strict]                                  a ResourceList on stdin and stdout (kpt, kustomize)
//	image-prefetcher-fn [--strict] config.yaml [resources.yaml|-]...  standalone: the resources and the instance as YAML
//
// Every result, warnings too, is printed to stderr as one line (resultLine), in both modes:
// only kpt shows the results of a ResourceList. With --strict a warning fails the run. A failed
// run returns an error: framework.Results when the lines on stderr already say why, another
// error (unread input) for the caller to print.
func NewCommand() *cobra.Command {
	var strict bool
	cmd := &cobra.Command{
		Use:   "image-prefetcher-fn [--strict] [config.yaml [resources.yaml...]]",
		Short: "Generate an image prefetcher instance from an ImagePrefetcher configuration",
		Long: "Without arguments, reads a ResourceList on stdin and writes it to stdout (kpt, kustomize exec).\n" +
			"With a configuration file, reads the resource files after it (- for stdin) and writes the\n" +
			"resources and the instance. Warnings and errors go to stderr, one line each.",
		Args:          cobra.ArbitraryArgs,
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	cmd.Flags().BoolVar(&strict, "strict", false, "fail the run (exit 1) when there is a warning")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		p := &cliProcessor{strict: strict, stderr: cmd.ErrOrStderr()}
		rw := &kio.ByteReadWriter{Writer: cmd.OutOrStdout(), KeepReaderAnnotations: true}
		if len(args) == 0 {
			rw.Reader = cmd.InOrStdin()
			return framework.Execute(p, rw)
		}
		// Standalone, as kyaml's command.Build does it: the resources out without the list
		// around them and without the reader's annotations.
		rw.KeepReaderAnnotations, rw.NoWrap = false, true
		config := args[0]
		fc, results, err := readConfigFile(config)
		if err != nil {
			return err
		}
		if len(results) > 0 {
			printResults(p.stderr, results)
			return results
		}
		rw.FunctionConfig = fc
		// A relative spec.imagesFile is relative to the configuration file here; under kpt and
		// kustomize, to the directory they run the function in.
		p.Processor = Processor{Dir: filepath.Dir(config), ConfigFile: config}
		in, err := readResources(cmd.InOrStdin(), args[1:])
		if err != nil {
			return err
		}
		rw.Reader = bytes.NewReader(in)
		return framework.Execute(p, rw)
	}
	return cmd
}

// cliProcessor is the Processor that prints its results and applies --strict.
type cliProcessor struct {
	Processor
	strict bool
	stderr io.Writer
}

func (p *cliProcessor) Process(rl *framework.ResourceList) error {
	in := rl.Items
	err := p.Processor.Process(rl)
	if err == nil && p.strict {
		warnings := 0
		for _, r := range rl.Results {
			if r.Severity == framework.Warning {
				warnings++
			}
		}
		if warnings > 0 {
			msg := "--strict: the warning fails the run"
			if warnings > 1 {
				msg = fmt.Sprintf("--strict: the %d warnings fail the run", warnings)
			}
			r := &framework.Result{Severity: framework.Error, Message: msg, File: p.configFile(rl.FunctionConfig)}
			if fc := rl.FunctionConfig; fc != nil && fc.YNode().Kind == yaml.MappingNode {
				r.ResourceRef = &yaml.ResourceIdentifier{TypeMeta: yaml.TypeMeta{APIVersion: APIVersion, Kind: Kind}, NameMeta: yaml.NameMeta{Name: configName(fc)}}
			}
			rl.Results = append(rl.Results, r)
			// A failed run writes what it read, as after an error.
			rl.Items = in
			err = rl.Results
		}
	}
	printResults(p.stderr, rl.Results)
	return err
}

func printResults(w io.Writer, results framework.Results) {
	for _, r := range results {
		fmt.Fprintln(w, resultLine(r))
	}
}

// resultLine is a result as one line, naming where and what:
//
//	<severity>: [<file>: ]<Kind>/[<namespace>/]<name>[ <field>]: <message>
func resultLine(r *framework.Result) string {
	sev := r.Severity
	if sev == "" {
		sev = framework.Info
	}
	var b strings.Builder
	b.WriteString(string(sev) + ": ")
	if r.File != nil && r.File.Path != "" {
		b.WriteString(r.File.Path + ": ")
	}
	var where []string
	if ref := r.ResourceRef; ref != nil && (ref.Kind != "" || ref.Name != "") {
		id := ref.Kind
		if ref.Namespace != "" {
			id += "/" + ref.Namespace
		}
		where = append(where, id+"/"+ref.Name)
	}
	if r.Field != nil && r.Field.Path != "" {
		where = append(where, r.Field.Path)
	}
	if len(where) > 0 {
		b.WriteString(strings.Join(where, " ") + ": ")
	}
	b.WriteString(strings.NewReplacer("\r\n", " ", "\n", " ", "\r", " ").Replace(r.Message))
	return b.String()
}

// readConfigFile reads the configuration file of a standalone run. The file holds one
// configuration: a second document would otherwise be dropped without a word (kyaml reads the
// first), so each further document is an error result naming both.
func readConfigFile(name string) (*yaml.RNode, framework.Results, error) {
	raw, err := os.ReadFile(name)
	if err != nil {
		return nil, nil, fmt.Errorf("read the configuration file: %w", err)
	}
	type doc struct {
		node *yaml.RNode
		n    int // 1-based, among every document of the file
	}
	var docs []doc
	d := yaml.NewDecoder(bytes.NewReader(raw))
	for n := 1; ; n++ {
		var node yaml.Node
		if err := d.Decode(&node); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, nil, fmt.Errorf("parse the configuration file %s: %w", name, err)
		}
		rn := yaml.NewRNode(&node)
		if len(node.Content) == 0 || yaml.IsMissingOrNull(rn) {
			continue
		}
		docs = append(docs, doc{rn, n})
	}
	if len(docs) == 0 {
		// Decode says what is missing.
		return nil, nil, nil
	}
	first := docs[0]
	firstName := ""
	if first.node.YNode().Kind == yaml.MappingNode {
		firstName = configName(first.node)
	}
	var results framework.Results
	for _, o := range docs[1:] {
		r := &reporter{file: &framework.File{Path: name, Index: o.n - 1}}
		if o.node.YNode().Kind != yaml.MappingNode {
			r.errorf("", "", "document %d: the configuration file holds one document, the ImagePrefetcher configuration (document %d)", o.n, first.n)
			results = append(results, r.results...)
			continue
		}
		otherName := configName(o.node)
		r.ref = &yaml.ResourceIdentifier{
			TypeMeta: yaml.TypeMeta{APIVersion: o.node.GetApiVersion(), Kind: o.node.GetKind()},
			NameMeta: yaml.NameMeta{Name: otherName},
		}
		this := fmt.Sprintf("%s/%s (document %d)", Kind, firstName, first.n)
		if !isConfig(o.node) {
			r.errorf("", "", "document %d would be dropped: the configuration file holds one document, the configuration %s; "+
				"give resources in the files after it", o.n, this)
		} else {
			msg := fmt.Sprintf("a second configuration in the file (document %d) would be dropped: a run renders one, %s; "+
				"give each configuration a file of its own and run the function once per file", o.n, this)
			if otherName == firstName {
				msg += "; besides, " + uniqueNames(otherName, configNamespace(first.node), configNamespace(o.node))
			}
			r.errorf("metadata.name", otherName, "%s", msg)
		}
		results = append(results, r.results...)
	}
	return first.node, results, nil
}

// readResources reads the resource files of a standalone run ("-" is stdin, read first as kyaml
// does) into one stream. Each file ends its last document, so that the last document of one
// file and the first of the next never merge into one.
func readResources(stdin io.Reader, names []string) ([]byte, error) {
	var fromStdin, fromFiles [][]byte
	for _, name := range names {
		var raw []byte
		var err error
		if name == "-" {
			raw, err = io.ReadAll(stdin)
			if err != nil {
				return nil, fmt.Errorf("read the resources on stdin: %w", err)
			}
			fromStdin = append(fromStdin, raw)
			continue
		}
		raw, err = os.ReadFile(name)
		if err != nil {
			return nil, fmt.Errorf("read the resource file: %w", err)
		}
		fromFiles = append(fromFiles, raw)
	}
	var b bytes.Buffer
	for _, raw := range append(fromStdin, fromFiles...) {
		if b.Len() > 0 {
			b.WriteString("---\n")
		}
		b.Write(raw)
		if len(raw) > 0 && raw[len(raw)-1] != '\n' {
			b.WriteByte('\n')
		}
	}
	return b.Bytes(), nil
}

// configName is metadata.name of a configuration, read without kyaml's GetName, which panics
// when metadata is not a mapping.
func configName(n *yaml.RNode) string {
	v, err := n.Pipe(yaml.Lookup("metadata", "name"))
	if err != nil || v == nil {
		return ""
	}
	return yaml.GetValue(v)
}
