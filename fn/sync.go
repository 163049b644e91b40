package fn

import "sigs.k8s.io/kustomize/kyaml/yaml"

// syncNode makes dst equal to src in content while keeping what a person may have written
// into dst: comments, the order of the fields dst already has, and the style of unchanged
// scalars. Fields only in src are appended in src's order; fields only in dst are removed.
// Sequence items that are mappings with a name are matched by name, others by position.
func syncNode(dst, src *yaml.Node) {
	if dst.Kind != src.Kind {
		head, line, foot := dst.HeadComment, dst.LineComment, dst.FootComment
		*dst = *deepCopy(src)
		dst.HeadComment, dst.LineComment, dst.FootComment = head, line, foot
		return
	}
	switch dst.Kind {
	case yaml.ScalarNode:
		if dst.Value != src.Value || dst.ShortTag() != src.ShortTag() {
			dst.Value, dst.Tag, dst.Style = src.Value, src.Tag, src.Style
		}
	case yaml.MappingNode:
		srcIdx := map[string]int{}
		for i := 0; i+1 < len(src.Content); i += 2 {
			srcIdx[src.Content[i].Value] = i
		}
		var out []*yaml.Node
		seen := map[string]bool{}
		for i := 0; i+1 < len(dst.Content); i += 2 {
			k := dst.Content[i].Value
			j, ok := srcIdx[k]
			if !ok || seen[k] {
				continue
			}
			seen[k] = true
			syncNode(dst.Content[i+1], src.Content[j+1])
			out = append(out, dst.Content[i], dst.Content[i+1])
		}
		for i := 0; i+1 < len(src.Content); i += 2 {
			if !seen[src.Content[i].Value] {
				out = append(out, deepCopy(src.Content[i]), deepCopy(src.Content[i+1]))
			}
		}
		dst.Content = out
	case yaml.SequenceNode:
		byName := map[string]*yaml.Node{}
		for _, d := range dst.Content {
			if n := itemName(d); n != "" {
				byName[n] = d
			}
		}
		out := make([]*yaml.Node, 0, len(src.Content))
		for i, s := range src.Content {
			var d *yaml.Node
			if n := itemName(s); n != "" {
				d = byName[n]
				delete(byName, n)
			} else if i < len(dst.Content) && itemName(dst.Content[i]) == "" {
				d = dst.Content[i]
			}
			if d == nil {
				out = append(out, deepCopy(s))
				continue
			}
			syncNode(d, s)
			out = append(out, d)
		}
		dst.Content = out
	default:
		*dst = *deepCopy(src)
	}
}

// itemName is the name field of a mapping sequence item, the key most Kubernetes lists merge on.
func itemName(n *yaml.Node) string {
	if n.Kind != yaml.MappingNode {
		return ""
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == "name" && n.Content[i+1].Kind == yaml.ScalarNode {
			return n.Content[i+1].Value
		}
	}
	return ""
}

func deepCopy(n *yaml.Node) *yaml.Node {
	c := *n
	if n.Content != nil {
		c.Content = make([]*yaml.Node, len(n.Content))
		for i, ch := range n.Content {
			c.Content[i] = deepCopy(ch)
		}
	}
	return &c
}
