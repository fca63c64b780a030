// Command fdscheck reads FileDescriptorSets for tools/protoc/test.sh.
//
//	fdscheck summary SET.pb         decode SET, count what it declares, list its files
//	fdscheck compare WANT.pb GOT.pb compare two sets file by file
//
// compare requires the same files in the same order and, with source info
// set aside, the same descriptors, except for the google/protobuf files each
// compiler bundles (their contents follow that compiler's protobuf release:
// these are reported, not failed). Source info is compared location by
// location and reported; it must be present in GOT wherever WANT has it.
//
// Custom options (google.api.http and the like) are stored in a descriptor
// as encoded bytes, and two compilers may encode the same value with its
// fields in another order (Go writes oneof members last, protoc by field
// number). compare therefore decodes them with the extensions that WANT
// declares before comparing, so equal values compare equal.
package main

import (
	"fmt"
	"os"
	"strings"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

const bundled = "google/protobuf/"

func main() {
	var err error
	switch {
	case len(os.Args) == 3 && os.Args[1] == "summary":
		err = summary(os.Args[2])
	case len(os.Args) == 4 && os.Args[1] == "compare":
		err = compare(os.Args[2], os.Args[3])
	default:
		err = fmt.Errorf("usage: fdscheck summary SET.pb | fdscheck compare WANT.pb GOT.pb")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fdscheck: "+err.Error())
		os.Exit(1)
	}
}

func load(path string) (*descriptorpb.FileDescriptorSet, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	set := &descriptorpb.FileDescriptorSet{}
	if err := proto.Unmarshal(data, set); err != nil {
		return nil, fmt.Errorf("%s is not a FileDescriptorSet: %w", path, err)
	}
	if len(set.File) == 0 {
		return nil, fmt.Errorf("%s holds no files", path)
	}
	for i, f := range set.File {
		if f.GetName() == "" {
			return nil, fmt.Errorf("%s: file #%d has no name", path, i)
		}
	}
	return set, nil
}

type counts struct {
	files, messages, fields, enums, services, methods, withSourceInfo int
}

func (c counts) String() string {
	return fmt.Sprintf("%d files, %d messages, %d fields, %d enums, %d services, %d methods; source info in %d files",
		c.files, c.messages, c.fields, c.enums, c.services, c.methods, c.withSourceInfo)
}

func count(set *descriptorpb.FileDescriptorSet) counts {
	var c counts
	var message func(m *descriptorpb.DescriptorProto)
	message = func(m *descriptorpb.DescriptorProto) {
		c.messages++
		c.fields += len(m.Field)
		c.enums += len(m.EnumType)
		for _, n := range m.NestedType {
			message(n)
		}
	}
	for _, f := range set.File {
		c.files++
		for _, m := range f.MessageType {
			message(m)
		}
		c.enums += len(f.EnumType)
		c.services += len(f.Service)
		for _, s := range f.Service {
			c.methods += len(s.Method)
		}
		if len(f.GetSourceCodeInfo().GetLocation()) > 0 {
			c.withSourceInfo++
		}
	}
	return c
}

func summary(path string) error {
	set, err := load(path)
	if err != nil {
		return err
	}
	fmt.Printf("%s: %s\n", path, count(set))
	for _, name := range names(set) {
		fmt.Printf("file %s\n", name)
	}
	return nil
}

func compare(wantPath, gotPath string) error {
	want, err := load(wantPath)
	if err != nil {
		return err
	}
	got, err := load(gotPath)
	if err != nil {
		return err
	}
	fmt.Printf("want %s: %s\n", wantPath, count(want))
	fmt.Printf("got  %s: %s\n", gotPath, count(got))

	if w, g := names(want), names(got); strings.Join(w, "\n") != strings.Join(g, "\n") {
		return fmt.Errorf("the files differ in name or order:\nwant %s\ngot  %s", strings.Join(w, " "), strings.Join(g, " "))
	}

	types, err := extensions(want)
	if err != nil {
		return fmt.Errorf("%s: %w", wantPath, err)
	}
	failures, bundledDiffer := 0, 0
	for i, w := range want.File {
		g := got.File[i]
		wBare, err := decodeOptions(withoutSourceInfo(w), types)
		if err != nil {
			return fmt.Errorf("%s: %s: %w", wantPath, w.GetName(), err)
		}
		gBare, err := decodeOptions(withoutSourceInfo(g), types)
		if err != nil {
			return fmt.Errorf("%s: %s: %w", gotPath, g.GetName(), err)
		}
		same, total := sameLocations(w, g)
		info := fmt.Sprintf("source info %d/%d locations identical (got has %d)", same, total, len(g.GetSourceCodeInfo().GetLocation()))
		if total > 0 && len(g.GetSourceCodeInfo().GetLocation()) == 0 {
			fmt.Printf("FAIL %s: want has source info, got has none\n", w.GetName())
			failures++
			continue
		}
		switch {
		case proto.Equal(wBare, gBare):
			fmt.Printf("same %s: descriptors equal; %s\n", w.GetName(), info)
		case strings.HasPrefix(w.GetName(), bundled):
			bundledDiffer++
			fmt.Printf("bundled %s: each compiler ships its own release of this file; %s\n", w.GetName(), bundledDiff(wBare, gBare))
		default:
			fmt.Printf("FAIL %s: descriptors differ\n%s", w.GetName(), textDiff(wBare, gBare))
			failures++
		}
	}
	if failures > 0 {
		return fmt.Errorf("%d of %d files differ", failures, len(want.File))
	}
	fmt.Printf("ok: %d of %d files equal; %d bundled google/protobuf files differ as reported above\n",
		len(want.File)-bundledDiffer, len(want.File), bundledDiffer)
	return nil
}

// extensions builds the extension types that set declares, so custom
// options can be decoded.
func extensions(set *descriptorpb.FileDescriptorSet) (*protoregistry.Types, error) {
	files, err := protodesc.NewFiles(set)
	if err != nil {
		return nil, fmt.Errorf("cannot link the descriptor set: %w", err)
	}
	types := &protoregistry.Types{}
	var add func(xs protoreflect.ExtensionDescriptors) error
	add = func(xs protoreflect.ExtensionDescriptors) error {
		for i := 0; i < xs.Len(); i++ {
			if err := types.RegisterExtension(dynamicpb.NewExtensionType(xs.Get(i))); err != nil {
				return err
			}
		}
		return nil
	}
	var inMessages func(ms protoreflect.MessageDescriptors) error
	inMessages = func(ms protoreflect.MessageDescriptors) error {
		for i := 0; i < ms.Len(); i++ {
			if err := add(ms.Get(i).Extensions()); err != nil {
				return err
			}
			if err := inMessages(ms.Get(i).Messages()); err != nil {
				return err
			}
		}
		return nil
	}
	var rangeErr error
	files.RangeFiles(func(fd protoreflect.FileDescriptor) bool {
		if rangeErr = add(fd.Extensions()); rangeErr == nil {
			rangeErr = inMessages(fd.Messages())
		}
		return rangeErr == nil
	})
	return types, rangeErr
}

// decodeOptions re-reads f with the extensions in types known, so custom
// option values become fields instead of encoded bytes.
func decodeOptions(f *descriptorpb.FileDescriptorProto, types *protoregistry.Types) (*descriptorpb.FileDescriptorProto, error) {
	data, err := proto.Marshal(f)
	if err != nil {
		return nil, err
	}
	out := &descriptorpb.FileDescriptorProto{}
	if err := (proto.UnmarshalOptions{Resolver: types}).Unmarshal(data, out); err != nil {
		return nil, err
	}
	return out, nil
}

func names(set *descriptorpb.FileDescriptorSet) []string {
	out := make([]string, 0, len(set.File))
	for _, f := range set.File {
		out = append(out, f.GetName())
	}
	return out
}

func withoutSourceInfo(f *descriptorpb.FileDescriptorProto) *descriptorpb.FileDescriptorProto {
	c := proto.CloneOf(f)
	c.SourceCodeInfo = nil
	return c
}

// sameLocations counts want's source locations that got has too, equal in
// path, span and comments.
func sameLocations(want, got *descriptorpb.FileDescriptorProto) (same, total int) {
	have := map[string]int{}
	for _, l := range got.GetSourceCodeInfo().GetLocation() {
		have[locationKey(l)]++
	}
	for _, l := range want.GetSourceCodeInfo().GetLocation() {
		total++
		if k := locationKey(l); have[k] > 0 {
			have[k]--
			same++
		}
	}
	return same, total
}

func locationKey(l *descriptorpb.SourceCodeInfo_Location) string {
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(l)
	return string(b)
}

// bundledDiff says, for a bundled file, whether every message and field
// that want's copy declares is in got's copy with the same number and type:
// what the files that import it rely on.
func bundledDiff(want, got *descriptorpb.FileDescriptorProto) string {
	gotFields := map[string]*descriptorpb.FieldDescriptorProto{}
	var index func(prefix string, ms []*descriptorpb.DescriptorProto)
	index = func(prefix string, ms []*descriptorpb.DescriptorProto) {
		for _, m := range ms {
			for _, f := range m.Field {
				gotFields[prefix+m.GetName()+"."+f.GetName()] = f
			}
			index(prefix+m.GetName()+".", m.NestedType)
		}
	}
	index("", got.MessageType)

	var missing []string
	checked := 0
	var walk func(prefix string, ms []*descriptorpb.DescriptorProto)
	walk = func(prefix string, ms []*descriptorpb.DescriptorProto) {
		for _, m := range ms {
			for _, f := range m.Field {
				checked++
				name := prefix + m.GetName() + "." + f.GetName()
				g, ok := gotFields[name]
				if !ok || g.GetNumber() != f.GetNumber() || g.GetType() != f.GetType() || g.GetTypeName() != f.GetTypeName() {
					missing = append(missing, name)
				}
			}
			walk(prefix+m.GetName()+".", m.NestedType)
		}
	}
	walk("", want.MessageType)
	if len(missing) > 0 {
		return fmt.Sprintf("%d of want's %d fields missing or changed in got: %s", len(missing), checked, strings.Join(missing, " "))
	}
	return fmt.Sprintf("all %d of want's fields are in got with the same number and type", checked)
}

// textDiff prints the first lines where the text forms of two descriptors
// part ways.
func textDiff(want, got proto.Message) string {
	opts := prototext.MarshalOptions{Multiline: true}
	w := strings.Split(opts.Format(want), "\n")
	g := strings.Split(opts.Format(got), "\n")
	var b strings.Builder
	shown := 0
	for i := 0; i < len(w) || i < len(g); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			fmt.Fprintf(&b, "  line %d\n    want: %s\n    got:  %s\n", i+1, wl, gl)
			if shown++; shown == 10 {
				break
			}
		}
	}
	return b.String()
}
